"""The reproduction runner's ``--quick`` mode learns, and Burda et al.'s schedule and the logit units are right."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPRODUCE = Path(__file__).resolve().parents[2] / "benchmarks" / "reproduce"
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MNIST = DATA / "mnist"

# Measured (2-core x86_64 CPU, one thread, torch 2.13): after the quick budget (600 steps of 100
# images, about one pass over MNIST) the one-stochastic-layer VAE's test NLL on 1000 random test
# images (seed 0) with K = 100 was 176.51 ± 1.27 nats (172.91 ± 1.36 on the first 1000, which the
# runner used before it drew a random subset). After a single step it scores about 540, so a
# threshold of 190 (13.5 nats, about 10 standard errors, of margin) fails whenever learning breaks.
QUICK_NLL_THRESHOLD = 190.0


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"reproduce_{name}", REPRODUCE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_burda_schedule_has_3280_passes_and_the_paper_rates():
    schedule = _load("schedule")
    burda = schedule.BurdaSchedule()
    assert burda.total_epochs == sum(3**i for i in range(8)) == 3280
    stages = [schedule.burda_stage(e) for e in range(burda.total_epochs)]
    for i in range(8):
        assert stages.count(i) == 3**i  # stage i lasts 3^i passes
    assert stages == sorted(stages)
    rates = {burda.lr_at(e) for e in range(burda.total_epochs)}
    assert sorted(rates, reverse=True) == pytest.approx([1e-3 * 10 ** (-i / 7) for i in range(8)])
    assert burda.lr_at(10**6) == pytest.approx(1e-4)  # past the last stage the rate stays


def test_burda_schedule_sets_every_group_of_the_optimizer():
    schedule = _load("schedule")
    burda = schedule.BurdaSchedule(lr=1e-3, eps=1e-4)
    w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([{"params": [w]}, {"params": [b], "lr": 1e-2}], lr=1e-3)

    class Trainer:
        optimizers = [optimizer]
        current_epoch = 4  # stage 2

    burda.on_train_epoch_start(Trainer(), None)
    factor = 10 ** (-2 / 7)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-2 * factor)  # its own rate, same decay
    assert all(group["eps"] == 1e-4 for group in optimizer.param_groups)


def test_logit_log_det_matches_the_derivative_of_the_logit_map():
    run = _load("run")
    levels = torch.tensor([[0.0, 1.0, 0.5, 37 / 255]], dtype=torch.float64)
    alpha = 1e-2
    log_det = run.logit_log_det(levels, alpha=alpha, seed=3)
    # the same dequantization, differentiated by autograd
    u = torch.rand(levels.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = ((torch.round(levels * 255) + u) / 256).requires_grad_()
    z = torch.logit(alpha + (1 - 2 * alpha) * y)
    (grad,) = torch.autograd.grad(z.sum(), y)
    assert log_det.item() == pytest.approx(grad.log().sum().item(), rel=1e-10)


def test_every_row_has_a_config_that_names_its_paper_number():
    run = _load("run")
    for row in run.ROWS.values():
        text = row.config.read_text()
        assert str(abs(row.paper)) in text, row.name  # e.g. "86.76", "1323.2"


def _checkpoint_callbacks(row):
    import yaml

    callbacks = yaml.safe_load(row.config.read_text())["trainer"]["callbacks"]
    return [c.get("init_args", {}) for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]


def test_every_row_leaves_a_last_checkpoint_to_resume_from():
    # Lightning writes last.ckpt at an epoch's end only alongside another checkpoint of the same
    # callback: with save_top_k 0 a long run would leave nothing to --resume from, and with a
    # monitor only the best epochs (a resumed flow would go back to its best epoch)
    run = _load("run")
    for row in run.ROWS.values():
        last = [c for c in _checkpoint_callbacks(row) if c.get("save_last")]
        assert len(last) == 1, row.name
        assert last[0].get("save_top_k", 1) != 0 and last[0].get("monitor") is None, row.name


def test_flow_rows_resume_from_their_last_epoch_and_are_evaluated_at_their_best(tmp_path):
    # the flow configs' two checkpoint callbacks in real Lightning runs whose validation
    # log-likelihood peaks at the second of four epochs, and at the last
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    run = _load("run")
    row = run.ROWS["nice_mnist"]

    class Peaked(pl.LightningModule):
        def __init__(self, curve):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.curve = curve

        def training_step(self, batch, batch_idx):
            return (self.w - batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val/elbo", self.curve[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def on_save_checkpoint(self, checkpoint):
            checkpoint["pyro_lvm"] = {}  # what pyro_lvm's safe loader looks for

    from pyro_lvm.training import load_checkpoint

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=2)
    for curve, best_epoch in (([1.0, 3.0, 2.0, 0.0], 1), ([1.0, 3.0, 2.0, 4.0], 3)):
        checkpoints = tmp_path / f"peak{best_epoch}" / "run" / "checkpoints"
        callbacks = [ModelCheckpoint(dirpath=checkpoints, **c) for c in _checkpoint_callbacks(row)]
        trainer = pl.Trainer(max_epochs=4, callbacks=callbacks, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu")
        trainer.fit(Peaked(curve), data, data)
        assert load_checkpoint(str(checkpoints / "last.ckpt"))["epoch"] == 3  # --resume goes on from the end
        best = run.evaluated_checkpoint(row, checkpoints.parent)
        assert best.name == f"best-epoch{best_epoch:04d}.ckpt" and run._checkpoint_passes(best) == best_epoch + 1
        assert sorted(p.name for p in checkpoints.glob("best-*")) == [best.name]  # the best only
    # the binarized-MNIST rows, which run their schedule to the end, are evaluated on the last
    assert run.evaluated_checkpoint(run.ROWS["burda_1layer_vae"], checkpoints.parent).name == "last.ckpt"
    result = {"budget": {"passes": 4.0}, "checkpoint_passes": 2}
    assert run._evaluated_at(row, result) == "; evaluated at pass 2, its best validation log-likelihood"


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST IDX files not available in {MNIST}")
def test_quick_mode_learns_the_one_layer_vae(tmp_path):
    run = _load("run")
    results = run.main(["--quick", "--out", str(tmp_path), "--data", str(DATA), "--threads", "1"])
    (result,) = results
    assert result["row"] == "burda_1layer_vae"
    assert result["num_particles"] == 100 and result["num_points"] == 1000
    assert result["budget"]["steps"] == 600
    assert math.isfinite(result["ours"])
    assert result["ours"] < QUICK_NLL_THRESHOLD, result
    assert result["ours"] > 80.0, result  # below the paper's best would mean a broken estimate
    saved = json.loads((tmp_path / "burda_1layer_vae" / "result.json").read_text())
    assert saved["ours"] == pytest.approx(result["ours"])
    markdown = (tmp_path / "results.md").read_text()
    assert "86.76" in markdown and f"{result['ours']:.2f}" in markdown
    assert ".. list-table::" in (tmp_path / "results.rst").read_text()
    # a resumed run keeps the earlier session's curve (Lightning's CSV logger would overwrite
    # metrics.csv), its budget sums the sessions, and curves.py draws the whole curve
    resumed = run.main(["--quick", "--resume", "--max-steps", "640", "--out", str(tmp_path), "--data", str(DATA),
                        "--threads", "1", "--num-particles", "10", "--limit", "100"])
    folder = tmp_path / "burda_1layer_vae" / "run"
    assert (folder / "metrics.session1.csv").is_file() and (folder / "metrics.csv").is_file()
    assert resumed[0]["budget"]["steps"] == 640 and len(resumed[0]["budget"]["sessions"]) == 2
    curves = _load("curves")
    passes, values = curves.read_curve(folder)
    assert passes[0] == 1 and values[0] > result["ours"] - 20  # epoch 1's training objective: a bound above the NLL
    figure = tmp_path / "curves.png"
    assert curves.main(["--out", str(tmp_path), "--figure", str(figure)]) == ["burda_1layer_vae"]
    assert figure.stat().st_size > 10_000


def test_status_compares_with_the_rows_own_budget_whatever_max_epochs_asked():
    run = _load("run")
    row = run.ROWS["burda_1layer_iwae50"]
    # a budget.json written by a --max-epochs 4 run names 4 as its cap: the paper's is the config's 3280
    assert run._status(row, {"passes": 4.0, "max_epochs": 4}, quick=False) == "partial: 4 of 3280 passes"
    assert run._status(row, {"passes": 3280.0, "max_epochs": 3280}, quick=False) == "paper's budget"
    # a flow row: cut by --max-epochs (partial), stopped early below what it was allowed, or at the cap
    flow = run.ROWS["realnvp_maf_mnist"]
    cut = {"passes": 32.0, "epochs": 32, "sessions": [{"epochs": 32, "max_epochs": 32}]}
    assert run._status(flow, cut, quick=False) == "partial: 32 passes (the config trains up to 1000, with early stopping)"
    early = {"passes": 75.0, "epochs": 75, "sessions": [{"epochs": 75, "max_epochs": 1000}]}
    assert run._status(flow, early, quick=False) == "converged: early stopping after 75 passes"
    capped = {"passes": 1000.0, "epochs": 1000, "sessions": [{"epochs": 1000, "max_epochs": 1000}]}
    assert run._status(flow, capped, quick=False) == "stopped at the config's cap of 1000 passes"
    older = {"passes": 40.0, "epochs": 40, "sessions": [{"epochs": 40}]}  # a budget.json from before
    assert run._status(flow, older, quick=False).startswith("partial: 40 passes")
    # a session that --max-minutes ended is cut short, not converged, though it stopped below its
    # epochs: TimeBudget records that it stopped it (it ends sessions before their minutes run out)
    timed = {"passes": 60.0, "epochs": 60, "sessions": [{"epochs": 60, "max_epochs": 1500, "max_minutes": 100,
                                                         "wall_clock_s": 5900.0, "stopped_by_time": True}]}
    assert run._status(flow, timed, quick=False).startswith("partial: 60 passes")
    early_in_time = {**timed, "sessions": [{**timed["sessions"][0], "stopped_by_time": False}]}
    assert run._status(flow, early_in_time, quick=False) == "converged: early stopping after 60 passes"
    # a budget.json from the Timer's days (no record): past its minutes means cut by time
    older_timed = {**timed, "sessions": [{"epochs": 60, "max_epochs": 1500, "max_minutes": 100, "wall_clock_s": 6130.0}]}
    assert run._status(flow, older_timed, quick=False).startswith("partial: 60 passes")


def test_max_minutes_adds_a_time_budget_that_records_its_stop(tmp_path, monkeypatch):
    from pyro_lvm.cli.fit import LVMCLI

    monkeypatch.setattr("sys.argv", ["pyro-lvm"])
    run = _load("run")
    schedule = _load("schedule")
    args = run._parser().parse_args(["--max-minutes", "2.5"])
    config = run._fit_config(run.ROWS["burda_1layer_vae"], tmp_path, tmp_path, 0, args)
    cli = LVMCLI(args=["--config", str(config), "--trainer.logger", "false"], run=False)
    budgets = [c for c in cli.trainer.callbacks if type(c).__name__ == "TimeBudget"]
    assert len(budgets) == 1
    assert budgets[0].seconds == 150.0
    assert Path(budgets[0].record) == tmp_path / "burda_1layer_vae" / "time_budget.json"
    with pytest.raises(SystemExit):  # a budget of no time is refused
        run.main(["--max-minutes", "0", "--out", str(tmp_path)])
    assert schedule.TimeBudget.__name__ == type(budgets[0]).__name__


class _Trainer:
    should_stop = False
    current_epoch = 0


def test_time_budget_stops_on_the_last_epoch_boundary_that_fits(tmp_path):
    schedule = _load("schedule")
    now = [0.0]
    record = tmp_path / "stopped.json"
    budget = schedule.TimeBudget(100.0, record=str(record), clock=lambda: now[0])
    trainer = _Trainer()
    budget.on_train_start(trainer, None)
    ends = []
    # epochs of 30 s, one of 35 s: after the third (95 s) no epoch fits, after the second
    # (65 s) a third of the longest so far (35 s) ends at exactly 100 s, which fits
    for length in (30.0, 35.0, 30.0, 30.0):
        now[0] += length
        budget.on_train_epoch_end(trainer, None)
        ends.append(trainer.should_stop)
        if trainer.should_stop:
            break
        trainer.current_epoch += 1
    assert ends == [False, False, True]
    assert now[0] <= 100.0
    stopped = json.loads(record.read_text())
    assert stopped["stopped"] and stopped["epoch"] == 2 and stopped["longest_epoch_s"] == 35.0
    # a resumed session gets the whole budget again, and forgets the record of the last one
    trainer = _Trainer()
    budget.on_train_start(trainer, None)
    assert not record.exists()
    now[0] += 40.0
    budget.on_train_epoch_end(trainer, None)
    assert not trainer.should_stop  # 40 s in, the longest epoch 40 s: the next ends at 80 s
    now[0] += 30.0
    budget.on_train_epoch_end(trainer, None)
    assert trainer.should_stop  # 70 s in: another 40 s epoch would end at 110 s
    # a first epoch longer than the budget cannot be cut, but ends the session
    trainer = _Trainer()
    budget.on_train_start(trainer, None)
    now[0] += 150.0
    budget.on_train_epoch_end(trainer, None)
    assert trainer.should_stop
    with pytest.raises(ValueError, match="positive"):
        schedule.TimeBudget(0.0)


def test_beyond_table_states_the_gap_closed_only_at_equal_budgets():
    run = _load("run")

    def result(name, ours, passes):
        budget = {"passes": passes, "steps": 1, "batch_size": 20, "wall_clock_s": 60.0, "device": "cpu", "seed": 0}
        return {"row": name, "ours": ours, "stderr": 0.5, "num_particles": 5000, "num_points": 100,
                "budget": budget, "quick": False}

    markdown, rst = run.format_beyond([result("burda_1layer_iwae50", 90.0, 4), result("beyond_1layer_dreg50", 88.0, 4),
                                       result("beyond_1layer_iaf_iwae50", 89.0, 2)])
    lines = markdown.splitlines()
    assert len(lines) == 4  # header, rule, the two beyond rows with a baseline
    # (90 - 88) / (90 - 82.90) = 28%: the share of the gap to the two-layer number
    assert "| 28% |" in lines[2] and "82.90" in lines[2]
    assert "budgets differ" in lines[3]
    assert ".. list-table::" in rst


def test_flow_rows_build_the_papers_models_and_optimizers(tmp_path, monkeypatch):
    # what the configs' comments promise, as LightningCLI builds it: NICE with the logistic base
    # and Adam(beta2 = 0.99, eps = 1e-4); RealNVP (5) with nets of two hidden layers of 1024
    from pyro_lvm.cli.fit import LVMCLI
    from pyro_lvm.flows import AdditiveCoupling, AffineCoupling, DiagonalScaling

    monkeypatch.setattr("sys.argv", ["pyro-lvm"])  # the args below are the whole command line
    run = _load("run")
    built = {}
    for name in ("nice_mnist", "realnvp_maf_mnist"):
        cli = LVMCLI(
            args=["--config", str(run.ROWS[name].config), "--trainer.logger", "false",
                  "--trainer.default_root_dir", str(tmp_path), "--data.init_args.root", str(tmp_path)],
            run=False,
        )
        optimizer = cli.model.configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        built[name] = (cli.model.lvm, optimizer.param_groups[0])
    nice, group = built["nice_mnist"]
    assert nice.base_name == "logistic" and nice.num_levels == 256 and nice.logit_alpha is None
    assert [type(t) for t in nice.transform.parts] == [AdditiveCoupling] * 4 + [DiagonalScaling]
    assert {t.mask_kind for t in nice.transform.parts[:4]} == {"alternate"}  # the paper's odd/even split
    widths = [m.out_features for m in nice.transform.parts[0].modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [1000] * 5 + [392]
    assert (group["lr"], tuple(group["betas"]), group["eps"]) == (1e-3, (0.9, 0.99), 1e-4)
    realnvp, group = built["realnvp_maf_mnist"]
    couplings = [t for t in realnvp.transform.parts if isinstance(t, AffineCoupling)]
    assert len(couplings) == 5 and realnvp.base_name == "normal" and realnvp.logit_alpha == 1e-6
    widths = [m.out_features for m in couplings[0].modules() if isinstance(m, torch.nn.Linear)]
    assert widths[:2] == [1024, 1024] and len(widths) == 3
    assert group["lr"] == 1e-4


def test_paper_bits_per_dim_of_the_flow_rows():
    # NICE: the paper's 1980.50 nats of density on [0, 1]^784 is (784 log 256 - 1980.50) / (784 log 2)
    # bits/dim of the 8-bit data; logit rows shift both numbers by the same mean log-determinant
    curves = _load("curves")
    c, scale = 784 * math.log(256), 784 * math.log(2)
    ours = 1500.0
    nice = {"ours": ours, "bits_per_dim": (c - ours) / scale, "paper": 1980.50}
    assert curves.paper_bits_per_dim(nice) == pytest.approx((c - 1980.50) / scale, abs=1e-12)
    assert curves.paper_bits_per_dim(nice) == pytest.approx(4.3555, abs=1e-4)
    log_det = -2954.3  # an E[sum log|dz/dy|] of the logit map
    maf = {"ours": -1279.6, "bits_per_dim": (c - log_det - (-1279.6)) / scale, "paper": -1323.2}
    assert curves.paper_bits_per_dim(maf) == pytest.approx((c - log_det + 1323.2) / scale, abs=1e-12)


def test_child_runners_get_one_row_and_no_jobs():
    run = _load("run")
    argv = ["--rows", "a,b", "--jobs", "3", "--threads", "1", "--rows=c", "--jobs=2", "--max-minutes", "2"]
    assert run._child_argv(argv, "nice_mnist") == ["--threads", "1", "--max-minutes", "2", "--rows", "nice_mnist"]


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"MNIST IDX files not available in {MNIST}")
def test_jobs_run_rows_side_by_side_into_one_table(tmp_path):
    run = _load("run")
    rows = ["burda_1layer_vae", "burda_1layer_iwae5"]
    results = run.main(["--rows", ",".join(rows), "--jobs", "2", "--threads", "1", "--max-steps", "30",
                        "--batch-size", "100", "--num-particles", "10", "--limit", "50", "--out", str(tmp_path),
                        "--data", str(DATA)])
    assert [r["row"] for r in results] == rows
    for name in rows:
        assert (tmp_path / name / "runner.log").is_file() and (tmp_path / name / "result.json").is_file()
        assert json.loads((tmp_path / name / "budget.json").read_text())["steps"] == 30
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 4 and "IWAE k=5" in table[3]
