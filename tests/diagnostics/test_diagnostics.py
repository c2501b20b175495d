"""Gradient-variance diagnostics against closed forms on linear-Gaussian models.

For z ~ N(0, 1), x | z ~ N(z, 1) and the guide q(z) = N(loc, s^2),

    ELBO(x) = -log(2 pi) / 2 - (loc^2 + s^2) / 2 - ((x - loc)^2 + s^2) / 2 + log s + 1/2,

so the gradient of the loss -mean_i ELBO(x_i) is known exactly, and so is the variance of
the reparameterized estimate of its loc-coordinate: the mean over N points of
d/dloc [log p(x_i, z_i) - log q(z_i)] = x_i - 2 z_i, i.e. 4 s^2 / N (s^2 / N with the KL in
closed form, x_i - z_i - loc).
"""

import math

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm import VAE, LVMModule
from pyro_lvm.cli import main
from pyro_lvm.diagnostics import COLUMNS, format_table, gradient_variance

LOC, SCALE, N = 0.3, 0.5, 8
X = torch.linspace(0.5, 2.5, N)  # mean 1.5
DRAWS = 300


def model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = pyro.param("loc", torch.tensor(LOC))
    scale = pyro.param("scale", torch.tensor(SCALE), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(loc, scale))


def closed_form_gradient():
    """Gradient of -mean ELBO w.r.t. loc and the unconstrained log s (what the optimizer sees)."""
    loc = torch.tensor(LOC, dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(math.log(SCALE), dtype=torch.float64, requires_grad=True)
    s = log_scale.exp()
    x = X.double()
    elbo = (
        -0.5 * math.log(2 * math.pi) - 0.5 * (loc**2 + s**2) - 0.5 * ((x - loc) ** 2 + s**2)
        + log_scale + 0.5
    )
    d_loc, d_log_scale = torch.autograd.grad(-elbo.mean(), (loc, log_scale))
    return {"loc": float(d_loc), "scale": float(d_log_scale)}


def gaussian_pair(K):
    """z ~ N(0, I_K), x | z ~ N(z, I_K); q(z) = N(loc, diag scale^2) shared by the data points."""

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(K), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(K))
        scale = pyro.param("scale", torch.full((K,), 0.5), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


@pytest.fixture(scope="module")
def scalar_table():
    return gradient_variance(
        model, guide, ["reparam", "analytic_kl", "score_function"], X, num_draws=DRAWS
    )


def row(table, estimator, group):
    match = table[(table.estimator == estimator) & (table.group == group)]
    assert len(match) == 1, table
    return match.iloc[0]


# ----- (a) the mean gradient is the ELBO's gradient ---------------------------------------
@pytest.mark.parametrize("estimator", ["reparam", "analytic_kl", "score_function"])
@pytest.mark.parametrize("group", ["loc", "scale"])
def test_mean_gradient_matches_closed_form_gradient_of_the_elbo(scalar_table, estimator, group):
    exact = closed_form_gradient()[group]
    r = row(scalar_table, estimator, group)
    standard_error = math.sqrt(r.variance / DRAWS)
    assert standard_error < abs(exact) / 3  # the check below can tell the gradient from 0
    # a scalar group's grad_norm is |mean gradient|, and ||g| - |e|| <= |g - e|
    assert abs(r.grad_norm - abs(exact)) < 4 * standard_error


@pytest.mark.parametrize("estimator, variance", [("reparam", 4 * SCALE**2 / N), ("analytic_kl", SCALE**2 / N)])
def test_loc_variance_equals_closed_form(scalar_table, estimator, variance):
    # the sample variance of S draws has relative standard error sqrt(2 / (S - 1))
    r = row(scalar_table, estimator, "loc")
    assert abs(r.variance / variance - 1) < 4 * math.sqrt(2 / (DRAWS - 1))
    assert r.total_variance == pytest.approx(r.variance)  # one coordinate
    assert r.snr == pytest.approx(r.grad_norm / math.sqrt(r.variance))


# ----- (b) the lecture's claim ------------------------------------------------------------
def test_score_function_variance_dwarfs_reparameterized_variance():
    model16, guide16 = gaussian_pair(16)
    x = torch.randn(N, 16, generator=torch.Generator().manual_seed(0))
    table = gradient_variance(
        model16, guide16, ["reparam", "analytic_kl", "score_function"], x, num_draws=50
    )
    for group in ("loc", "scale"):
        reparam = row(table, "reparam", group)
        score = row(table, "score_function", group)
        assert score.variance > 10 * reparam.variance, table
        assert score.snr < reparam.snr, table
        assert reparam.num_params == score.num_params == 16
    assert row(table, "analytic_kl", "loc").variance <= row(table, "reparam", "loc").variance


# ----- (c) reproducible, and every estimator at the same point ----------------------------
def test_same_seed_same_table_and_global_state_untouched():
    pyro.clear_param_store()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = gradient_variance(model, guide, ["reparam", "score_function"], X, num_draws=20, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the global random state is restored
    assert list(pyro.get_param_store().keys()) == []  # the pair ran in a private store
    b = gradient_variance(model, guide, ["reparam", "score_function"], X, num_draws=20, seed=7)
    c = gradient_variance(model, guide, ["reparam", "score_function"], X, num_draws=20, seed=8)
    stats = ["grad_norm", "variance", "total_variance", "snr"]
    pd.testing.assert_frame_equal(a[stats], b[stats])
    assert not a[stats].equals(c[stats])


def test_each_estimator_is_measured_at_the_same_point_whatever_the_order():
    # a stateful estimator (the score function's running-average baseline) measured after
    # others, or twice, sees the same parameters and starts from the same state
    stats = ["estimator", "group", "grad_norm", "variance", "snr"]
    forward = gradient_variance(model, guide, ["reparam", "score_function"], X, num_draws=10)
    backward = gradient_variance(model, guide, ["score_function", "reparam"], X, num_draws=10)
    key = ["estimator", "group"]
    pd.testing.assert_frame_equal(
        forward[stats].sort_values(key).reset_index(drop=True),
        backward[stats].sort_values(key).reset_index(drop=True),
    )


def test_trained_module_is_measured_in_place_and_left_unchanged():
    vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
    module = LVMModule(vae, estimator="score_function")
    x = torch.bernoulli(torch.full((16, 4), 0.5), generator=torch.Generator().manual_seed(0))
    module.initialize(x)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    own = module.estimator
    table = gradient_variance(module, None, {"mine": own, "reparam": "reparam"}, x, num_draws=5)
    assert list(table.estimator.unique()) == ["mine", "reparam"]
    assert module.estimator is own and module.objective.elbo is own
    after = module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_gradient_does_not_depend_on_the_guide_estimator_given_the_draws():
    # reparam and analytic_kl differ only in the KL term, which the decoder does not see:
    # with the same seeds they draw the same z, so the decoder rows coincide
    vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8])
    x = torch.bernoulli(torch.full((16, 4), 0.5), generator=torch.Generator().manual_seed(0))
    table = gradient_variance(vae, None, ["reparam", "analytic_kl"], x, num_draws=5)
    reparam, analytic = row(table, "reparam", "decoder"), row(table, "analytic_kl", "decoder")
    for column in ("grad_norm", "variance", "snr"):
        assert analytic[column] == pytest.approx(reparam[column], rel=1e-5)
    assert row(table, "analytic_kl", "encoder").variance < row(table, "reparam", "encoder").variance


# ----- (d) groups ------------------------------------------------------------------------
def test_default_groups_are_first_name_components():
    vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8], likelihood="gaussian")
    x = torch.rand(16, 4)
    table = gradient_variance(vae, None, ["reparam"], x, num_draws=3)
    assert list(table.columns) == list(COLUMNS)
    assert sorted(table.group) == ["decoder", "encoder", "likelihood"]  # in the module's order
    assert table.num_params.sum() == sum(p.numel() for p in vae.parameters())
    assert list(gradient_variance(model, guide, ["reparam"], X, num_draws=3).group) == ["loc", "scale"]


def test_custom_groups_select_by_dotted_prefix():
    vae = VAE(data_shape=4, latent_dim=2, hidden_dims=[8], likelihood="gaussian")
    x = torch.rand(16, 4)
    groups = {"guide": ["encoder"], "model": ["decoder", "likelihood"], "first layer": ["encoder.0"]}
    table = gradient_variance(vae, None, ["reparam"], x, num_draws=3, groups=groups)
    assert list(table.group) == ["guide", "model", "first layer"]
    sizes = dict(zip(table.group, table.num_params))
    assert sizes["guide"] == sum(p.numel() for p in vae.encoder.parameters())
    assert sizes["model"] == sum(p.numel() for p in vae.decoder.parameters()) + sum(
        p.numel() for p in vae.likelihood.parameters()
    )
    assert sizes["first layer"] == vae.encoder[0].weight.numel() + vae.encoder[0].bias.numel()
    # groups are unions of coordinates: total variances add up
    default = gradient_variance(vae, None, ["reparam"], x, num_draws=3)
    parts = dict(zip(default.group, default.total_variance))
    totals = dict(zip(table.group, table.total_variance))
    assert totals["model"] == pytest.approx(parts["decoder"] + parts["likelihood"])


def test_dict_batches_pass_extra_keys_to_the_pair_that_accepts_them():
    def guide_with_index(x, index):
        assert index.shape == (len(x),)
        guide(x)

    table = gradient_variance(
        model, guide_with_index, ["reparam"], {"x": X, "index": torch.arange(N)}, num_draws=3
    )
    assert list(table.group) == ["loc", "scale"]


def test_format_table_is_fixed_width_text(scalar_table):
    text = format_table(scalar_table)
    lines = text.splitlines()
    assert lines[0].split() == list(COLUMNS)
    assert len(lines) == len(scalar_table) + 1
    assert len({len(line) for line in lines}) == 1


# ----- (e) errors ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "estimators, kwargs, error, match",
    [
        (["reparm"], {}, ValueError, "Unknown estimator 'reparm'; valid names"),
        ([], {}, ValueError, "No estimators given"),
        ({}, {}, ValueError, "No estimators given"),
        (["reparam"], {"num_draws": 1}, ValueError, "num_draws must be at least 2 to estimate a variance; got 1"),
        (["reparam", "reparam"], {}, ValueError, "'reparam' appears more than once"),
        ([("score_function", {"baselin": "none"})], {}, ValueError, "has no option 'baselin'"),
        ([42], {}, TypeError, "Cannot use 42 as an estimator"),
        (["reparam"], {"groups": {"enc": ["encoder"]}}, ValueError, "matches no parameter; parameter names: loc, scale"),
    ],
)
def test_errors_say_what_was_wrong(estimators, kwargs, error, match):
    with pytest.raises(error, match=match):
        gradient_variance(model, guide, estimators, X, **kwargs)


def test_an_lvm_module_takes_no_second_guide():
    module = LVMModule(model, guide)
    with pytest.raises(ValueError, match="Pass guide=None"):
        gradient_variance(module, guide, ["reparam"], X)


def test_labels_of_options_and_instances():
    from pyro_lvm.estimators import ReparamELBO

    table = gradient_variance(
        model, guide, [("score_function", {"num_particles": 2}), ReparamELBO()], X, num_draws=2
    )
    assert list(table.estimator.unique()) == ["score_function(num_particles=2)", "ReparamELBO"]


# ----- the command line --------------------------------------------------------------------
@pytest.fixture
def command_line(monkeypatch, tmp_path):
    # main(args) stands for the command line; pytest's own arguments are not part of it
    monkeypatch.setattr("sys.argv", ["pyro-lvm"])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_prints_the_table_for_the_default_config(command_line, capsys):
    output = command_line / "table.csv"
    main([
        "gradient-variance", "--num_draws", "3", "--estimators", "reparam,score_function",
        "--model.model.init_args.hidden_dims=[16]", f"--output={output}",
    ])
    out = capsys.readouterr().out
    assert "3 draws" in out and "DigitsDataModule" in out
    table = pd.read_csv(output)
    assert list(table.columns) == list(COLUMNS)
    assert list(zip(table.estimator, table.group)) == [
        ("reparam", "encoder"), ("reparam", "decoder"),
        ("score_function", "encoder"), ("score_function", "decoder"),
    ]
    assert format_table(table) in out


def test_cli_help_and_errors(command_line, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["gradient-variance", "--help"])
    assert exit.value.code == 0
    assert "--num_draws" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        main(["gradient-variance", "--num_draw", "5"])
    assert exit.value.code == 2
    assert "unrecognized arguments: --num_draw 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gradient-variance", "--estimators", "reparam,score_fn"])
    assert "Unknown estimator 'score_fn'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gradient-variance", "--num_draws", "1"])
    assert "--num_draws must be at least 2" in capsys.readouterr().err


def test_cli_measures_at_the_parameters_of_a_checkpoint(command_line, capsys):
    from pyro_lvm import fit
    from pyro_lvm.data import DigitsDataModule

    # the checkpoint's model: a Bernoulli VAE on the binarized digits (the default run models grey levels)
    small = ["--model.model.init_args.hidden_dims=[16]", "--model.model.init_args.likelihood=bernoulli",
             "--data.init_args.binarize=static"]
    module = fit(
        VAE(data_shape=64, latent_dim=2, hidden_dims=[16]), data=DigitsDataModule(batch_size=64),
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, log_every_n_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    ckpt = command_line / "trained.ckpt"
    module.trainer.save_checkpoint(ckpt)
    args = ["gradient-variance", "--num_draws", "2", "--estimators", "reparam", *small]
    main([*args, "--output=initial.csv"])
    main([*args, f"--ckpt_path={ckpt}", "--output=trained.csv"])
    assert f"at the parameters of {ckpt}" in capsys.readouterr().out
    initial, trained = pd.read_csv("initial.csv"), pd.read_csv("trained.csv")
    assert (initial.num_params == trained.num_params).all()
    assert not initial.grad_norm.equals(trained.grad_norm)
