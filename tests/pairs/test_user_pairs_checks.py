"""A Pyro user's own pairs (tests/pyro_pairs) through every posterior check, the ArviZ export and the command line.

Each pair is trained once; then every check that applies to it runs on the trained module (the module is a
pair: ``pyro_lvm.evaluate(module, x)``), and every check that cannot apply is refused at once, saying why and
what to use instead: the per-input checks on a model with global latents, NUTS and the Gaussian refinement on a
discrete latent, SBC where an observed site is not an argument of the model.
"""

import json
import logging
import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_lvm
from pyro_lvm.cli import main
from pyro_lvm.diagnostics import amortization_gap, compare_with_nuts, psis_khat, sbc, to_inference_data
from pyro_pairs.data import DATA, data_module
from test_user_pairs import PAIRS, QUIET

NAMES = list(PAIRS)
GLOBAL = ("gmm", "factor_analysis")  # global latents: no per-input weights
ESTIMATOR = {"ssvae": "enum", "gmm": "enum"}


@pytest.fixture(scope="module")
def trained():
    """Each pair trained briefly by pyro_lvm.fit; name -> (module, held-out batch)."""
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    out = {}
    for name, spec in PAIRS.items():
        torch.manual_seed(0)
        data = data_module(name)
        module = pyro_lvm.fit(spec["make"](), data=data, estimator=ESTIMATOR.get(name, "reparam"), lr=0.02,
                              rename=spec["rename"], max_steps=40, limit_val_batches=2, **QUIET)
        data.setup("test")
        out[name] = (module.eval(), next(iter(data.val_dataloader())))
    return out


def inputs(batch: dict, n: int) -> tuple[torch.Tensor, dict]:
    """The first ``n`` points: ``x`` and the other entries by batch key (the module renames them)."""
    return batch["x"][:n], {k: v[:n] for k, v in batch.items() if k not in ("x", "index")}


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_gives_the_held_out_elbo_and_log_likelihood_where_it_exists(name, trained):
    module, batch = trained[name]
    x, kwargs = inputs(batch, 60)
    pyro.set_rng_seed(0)
    result = pyro_lvm.evaluate(module, x, num_particles=20, batch_size=20, **kwargs)
    assert math.isfinite(result.elbo)
    if name in GLOBAL:  # log p(x) is one integral over the data set: none per point, and the ELBO says so
        assert result.log_likelihood is None and result.bits_per_dim is None
        with pytest.raises(ValueError, match="global latents.*pyro.condition"):
            pyro_lvm.log_likelihood(module, x, num_particles=5, **kwargs)
    else:
        assert result.log_likelihood >= result.elbo - 1e-6  # IWAE with K particles vs their mean
        ll = pyro_lvm.log_likelihood(module, x, num_particles=20, **kwargs)
        assert ll.per_point.shape == (60,) and torch.isfinite(ll.per_point).all()
    if name != "gmm":  # the mixture's assignment is summed out in the model: no terms apart
        assert result.elbo == pytest.approx(result.reconstruction - result.kl, abs=1e-6)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in GLOBAL])
def test_psis_khat_and_the_arviz_export_of_each_local_pair(name, trained):
    module, batch = trained[name]
    x, kwargs = inputs(batch, 4)
    pyro.set_rng_seed(0)
    khat = psis_khat(module, x=x, num_particles=200, **kwargs)
    assert khat.shape == (4,) and not torch.isnan(khat).any()
    idata = to_inference_data(module, x=x, num_samples=100, num_chains=4, **kwargs)
    latent = {"vae": "latent", "cvae": "z", "ssvae": "z"}[name]
    assert dict(idata.posterior[latent].sizes)["obs"] == 4  # the site named "latent" is kept
    rhat = az.rhat(idata, var_names=[latent])[latent].values
    assert np.isfinite(rhat).all() and (np.abs(rhat - 1) < 0.05).all()
    assert idata.sample_stats["khat"].shape == (4,)


@pytest.mark.parametrize("name", GLOBAL)
def test_per_input_checks_refuse_global_latents_at_once(name, trained):
    module, batch = trained[name]
    x, kwargs = inputs(batch, 4)
    for check in (lambda: psis_khat(module, x=x, num_particles=50),
                  lambda: to_inference_data(module, x=x, num_samples=10),
                  lambda: amortization_gap(module, x, num_steps=2, eval_particles=10, log_likelihood_particles=10),
                  lambda: compare_with_nuts(module, x, num_samples=4, warmup_steps=2),
                  lambda: sbc(module, x=x, num_simulations=4, num_draws=9, num_bins=5)):
        with pytest.raises(ValueError, match="global|outside|data plate"):
            check()


@pytest.mark.parametrize("name", ["vae", "cvae"])
def test_amortization_gap_nuts_and_sbc_on_the_continuous_local_pairs(name, trained):
    # the CVAE does not broadcast over particles: every one of these runs its draws one at a time
    module, batch = trained[name]
    x, kwargs = inputs(batch, 2)
    pyro.set_rng_seed(0)
    gap = amortization_gap(module, x, num_steps=20, eval_particles=50, log_likelihood_particles=50, **kwargs)
    assert len(gap.table) == 2 and np.isfinite(gap.table["amortization_gap"]).all()
    nuts = compare_with_nuts(module, x[:1], num_samples=10, warmup_steps=10, guide_samples=20,
                             **{k: v[:1] for k, v in kwargs.items()})
    assert np.isfinite(nuts.table["nuts_mean"]).all()
    if name == "vae":
        result = sbc(module, x=x, num_simulations=20, num_draws=9, num_bins=5)
        assert result.ranks.shape == (20, 2)
    else:  # the CVAE observes ys[xs == -1], a gather that is no argument: SBC cannot simulate it, and says so
        with pytest.raises(ValueError, match="cannot tell which argument.*observes"):
            sbc(module, x=x, num_simulations=20, num_draws=9, num_bins=5, **kwargs)


def test_checks_that_need_continuous_latents_refuse_the_semi_supervised_vae(trained):
    module, batch = trained["ssvae"]
    x, kwargs = inputs(batch, 2)
    with pytest.raises(ValueError, match="continuous latents.*'y_unobserved'.*psis_khat"):
        amortization_gap(module, x, num_steps=2, eval_particles=10, log_likelihood_particles=10, **kwargs)
    with pytest.raises(ValueError, match="continuous latents.*'y_unobserved'.*NUTS"):
        compare_with_nuts(module, x, num_samples=4, warmup_steps=2, **kwargs)


@pytest.mark.parametrize("site", ["latent", "obs", "chain", "draw", "x"])
def test_arviz_export_keeps_a_latent_site_whatever_its_name(site):
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample(site, dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("y" if site == "x" else "x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample(site, dist.Normal(x / 2, 0.5 ** 0.5).to_event(1))  # the exact posterior

    x = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
    pyro.set_rng_seed(0)
    idata = to_inference_data(model, guide, x, num_samples=300, num_chains=4)
    # ArviZ drops a variable named like a dim: none is; ArviZ's own chain and draw take the site's name
    variable = site + "_" if site in ("chain", "draw") else site
    assert variable in idata.posterior.data_vars and idata.posterior[variable].attrs["site"] == site
    summary = az.summary(idata, var_names=[variable], round_to="none")
    assert len(summary) == 3 * 2  # every input and coordinate of the site, not another group
    assert np.allclose(summary["mean"].to_numpy().reshape(3, 2), (x / 2).numpy(), atol=4 * 0.5 ** 0.5 / 1200 ** 0.5)
    assert (np.abs(summary["r_hat"].to_numpy() - 1) < 0.02).all()


# ----- the command line, from a YAML config that names the pair's class ----------------------
def config(name: str, root) -> str:
    spec = PAIRS[name]
    cls, options = DATA[name]
    pair = {"vae": "vae.VAE", "cvae": "cvae.CVAE", "ssvae": "ssvae.SSVAE", "gmm": "gmm.GaussianMixture",
            "factor_analysis": "factor_analysis.FactorAnalysis"}[name]
    init = {"factor_analysis": {"num_data": 360}}.get(name, {})
    return json.dumps({  # YAML is a superset of JSON
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                                                              "init_args": {"save_dir": str(root), "name": name}}},
        "model": {"model": {"class_path": f"pyro_pairs.{pair}", "init_args": init},
                  "estimator": ESTIMATOR.get(name, "reparam"), "rename": spec["rename"]},
        "data": {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": options},
    })


@pytest.mark.parametrize("name", NAMES)
def test_fit_evaluate_and_diagnose_from_a_config_naming_the_pair(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["pyro-lvm"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(config(name, tmp_path))
    main(["fit", f"--config={path}"])
    ckpt = tmp_path / name / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    main(["evaluate", f"--ckpt={ckpt}", "--num-particles=10", "--limit=20", "--split=val"])
    saved = json.loads((ckpt.parents[1] / "evaluate_val.json").read_text())
    assert saved["num_points"] == 20 and math.isfinite(saved["elbo"])
    assert (saved["log_likelihood"] is None) == (name in GLOBAL)
    out = tmp_path / "diagnose"
    main(["diagnose", f"--ckpt={ckpt}", "--split=val", "--num-inputs=6", "--num-particles=20", f"--output-dir={out}",
          "--gap-inputs=2", "--gap-steps=3", "--num-simulations=10", "--nuts-inputs=1", "--nuts-samples=4",
          "--nuts-warmup=2"])
    report = (out / "report.md").read_text()
    assert "Pareto k-hat" in report and "KL per latent dimension" in report
    if name in GLOBAL:
        assert report.count("Not run for this model") == 4 and "global latents" in report
    else:
        assert (out / "khat_histogram.png").is_file()
