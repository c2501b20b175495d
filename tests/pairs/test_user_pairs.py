"""A Pyro user's own pairs (tests/pyro_pairs, written as Pyro's examples write them) through pyro_lvm's training.

Each pair trains with every estimator that applies to it; every other estimator is refused before any
step, with the reason and what to use instead; and each pair trained by ``pyro_lvm.fit`` reaches the
held-out ELBO that stock ``pyro.infer.SVI`` reaches on the same batches from the same start.
"""

import copy
import logging
import math

import pyro
import pytest
import pytorch_lightning as pl
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate

import pyro_lvm
from pyro_lvm.estimators import make_elbo
from pyro_pairs.cvae import CVAE
from pyro_pairs.data import FixedBatches, data_module
from pyro_pairs.factor_analysis import FactorAnalysis
from pyro_pairs.gmm import GaussianMixture
from pyro_pairs.ssvae import SSVAE
from pyro_pairs.vae import VAE

QUIET = dict(enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False)

PAIRS = {
    "vae": dict(make=lambda: VAE(), rename={}),
    "cvae": dict(make=lambda: CVAE(), rename={"y": "ys"}),
    "ssvae": dict(make=lambda: SSVAE(), rename={}),
    "gmm": dict(make=lambda: GaussianMixture(), rename={}),
    "factor_analysis": dict(make=lambda: FactorAnalysis(num_data=360), rename={}),
}

# (pair, estimator, particles): what applies. The CVAE's multi-particle estimators and the factor model's
# run their particles one at a time: neither model broadcasts over a particle dimension.
CONTINUOUS = [("reparam", 1), ("analytic_kl", 1), ("stl", 1), ("iwae", 3), ("dreg", 3), ("score_function", 2),
              ("vimco", 3)]
APPLICABLE = (
    [("vae", e, k) for e, k in CONTINUOUS]
    + [("cvae", e, k) for e, k in CONTINUOUS]
    + [("factor_analysis", e, k) for e, k in CONTINUOUS]
    + [("ssvae", "enum", 1), ("ssvae", "reparam", 1), ("ssvae", "score_function", 2), ("ssvae", "vimco", 3)]
    + [("gmm", "enum", 1)]
)
# (pair, estimator, what the refusal must say)
REFUSED = [
    ("vae", "enum", "no discrete latent"),
    ("vae", "relaxed", "no discrete latent"),
    ("factor_analysis", "enum", "no discrete latent"),
    ("ssvae", "analytic_kl", "reparameterizable.*'y_unobserved'.*'enum'"),
    ("ssvae", "stl", "reparameterizable.*'y_unobserved'"),
    ("ssvae", "iwae", "reparameterizable.*'y_unobserved'.*'vimco'"),
    ("ssvae", "dreg", "reparameterizable.*'y_unobserved'"),
    ("ssvae", "relaxed", "cannot relax.*'y_unobserved'.*OneHotCategorical"),
    ("gmm", "reparam", "'assignment' for enumeration.*Use 'enum'"),
    ("gmm", "analytic_kl", "'assignment' for enumeration.*Use 'enum'"),
    ("gmm", "iwae", "'assignment' for enumeration"),
    ("gmm", "score_function", "'assignment' for enumeration"),
]


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)


# the score-function estimators' variance on the factor model (its local terms scaled by N / B = 5.6) needs a
# smaller rate and more steps (at 0.02 they drift; margin: any improvement), and DReG more steps.
SLOWER = {("factor_analysis", "score_function"): (0.005, 150, 0.0), ("factor_analysis", "vimco"): (0.005, 150, 0.0),
          ("factor_analysis", "dreg"): (0.02, 60, 0.5)}


@pytest.mark.parametrize("name, estimator, particles", APPLICABLE, ids=lambda v: str(v))
def test_pair_learns_with_each_applicable_estimator(name, estimator, particles):
    spec = PAIRS[name]
    torch.manual_seed(0)
    pair = spec["make"]()
    data = data_module(name)
    trainer_kw = dict(limit_val_batches=3, **QUIET)
    untrained = pyro_lvm.LVMModule(pair, estimator="enum" if name == "gmm" else "reparam", rename=spec["rename"])
    start = pl.Trainer(**trainer_kw).validate(untrained, datamodule=data, verbose=False)[0]["val/elbo"]
    lr, steps, margin = SLOWER.get((name, estimator), (0.02, 25, 0.5))
    # Pyro itself warns that Trace_ELBO samples a site the guide marks for enumeration (warn where Pyro warns)
    warns = pytest.warns(UserWarning, match="enumerate") if (name, estimator) == ("ssvae", "reparam") else _no_warning()
    with warns:
        module = pyro_lvm.fit(pair, data=data, estimator=make_elbo(estimator, num_particles=particles), lr=lr,
                              rename=spec["rename"], max_steps=steps, **trainer_kw)
    after = float(module.trainer.callback_metrics["val/elbo"])
    assert math.isfinite(after)
    assert after > start + margin, f"{name} with {estimator}: held-out ELBO {start:.2f} -> {after:.2f}"
    if particles > 1:  # the path the particles took was decided and said
        vectorized = module.vectorization
        assert vectorized is not None and vectorized.reason
        # neither the masked CVAE nor the factor model (z @ W.T mixes particles) broadcasts
        assert bool(vectorized) == (name not in ("cvae", "factor_analysis"))


@pytest.mark.parametrize("name, estimator, message", REFUSED, ids=lambda v: str(v))
def test_inapplicable_estimator_is_refused_before_any_step(name, estimator, message):
    spec = PAIRS[name]
    pair = spec["make"]()
    k = 3 if estimator in ("iwae", "dreg") else 1
    with pytest.raises(ValueError, match=message):
        pyro_lvm.fit(pair, data=data_module(name), estimator=make_elbo(estimator, num_particles=k), rename=spec["rename"],
                     max_steps=5, **QUIET)


def test_the_cvae_is_refused_until_its_target_reaches_ys_then_trains():
    # Pyro's CVAE example calls its target ys; the data module's key is y: left alone, the model never sees it
    cvae = CVAE()
    before = copy.deepcopy(cvae.state_dict())
    with pytest.raises(ValueError, match=r"'y' reaches no argument.*\['xs', 'ys'\].*Did you mean 'ys'.*rename="):
        pyro_lvm.fit(cvae, data=data_module("cvae"), max_steps=5, **QUIET)
    assert all(torch.equal(before[k], v) for k, v in cvae.state_dict().items())  # refused before any step
    module = pyro_lvm.fit(cvae, data=data_module("cvae"), rename={"y": "ys"}, max_steps=5, **QUIET)
    assert module.trainer.global_step == 5


def test_a_model_that_observes_nothing_is_refused():
    class Unconditional(CVAE):  # the target under a name nothing passes: ys stays None, y is deterministic
        def model(self, xs, target=None):
            return super().model(xs, None)

        def guide(self, xs, target=None):
            return super().guide(xs, None)

    with pytest.raises(ValueError, match="observed nothing.*no sample site has obs"):
        pyro_lvm.fit(Unconditional(), data=data_module("cvae"), max_steps=5, **QUIET)


# ----- the same numbers as stock Pyro ----------------------------------------------------------
def pyro_loss(name: str, particles: int = 1):
    """Stock Pyro's ELBO for the pair: TraceEnum_ELBO where it sums a site out, else Trace_ELBO."""
    if name in ("ssvae", "gmm"):
        return TraceEnum_ELBO(max_plate_nesting=1, num_particles=particles, vectorize_particles=False)
    return Trace_ELBO(num_particles=particles)


def pyro_guide(name: str, pair):
    # Pyro's SS-VAE tutorial enumerates the guide's missing labels (pyro_lvm's "enum" does it itself)
    return config_enumerate(pair.guide, "parallel") if name == "ssvae" else pair.guide


@pytest.mark.parametrize("name", ["vae", "cvae", "ssvae", "gmm", "factor_analysis"])
def test_fit_reaches_the_held_out_elbo_of_stock_pyro_svi_on_the_same_batches(name):
    spec = PAIRS[name]
    dm = data_module(name)
    dm.setup("fit")
    steps = 150 if name == "factor_analysis" else 30  # the factor model, near its optimum: 150 steps
    batches = [b for _, b in zip(range(steps), dm.train_dataloader())]
    batches = (batches * steps)[:steps]  # the mixture's one full batch and the factor model's 6, repeated
    val = next(iter(dm.val_dataloader()))
    model_keys = pyro_lvm.pairs.call_keys(spec["make"]().model)

    def call(batch):
        args, kwargs, _ = pyro_lvm.pairs.split_batch(batch, spec["rename"])
        return args, {k: v for k, v in kwargs.items() if k in model_keys}

    def held_out(pair) -> float:  # the same estimate for both runs: many draws of stock Pyro's ELBO
        args, kwargs = call(val)
        pyro.set_rng_seed(1)
        with torch.no_grad():
            return -pyro_loss(name, 50).loss(pair.model, pyro_guide(name, pair), *args, **kwargs) / len(args[0])

    def made():  # the pair, its autoguide's parameters created (the same start for both runs)
        torch.manual_seed(0)
        pair = spec["make"]()
        with torch.no_grad(), pyro.get_param_store().scope():
            pyro.poutine.trace(pair.guide).get_trace(*call(batches[0])[0], **call(batches[0])[1])
        return pair

    ours = made()
    start = copy.deepcopy(ours.state_dict())
    module = pyro_lvm.fit(ours, data=FixedBatches(batches, [val]), estimator="enum" if name in ("ssvae", "gmm")
                          else "reparam", lr=0.01, rename=spec["rename"], max_epochs=1, num_sanity_val_steps=0, **QUIET)
    with module._scope():  # the pair's pyro.params live in the module
        ours_elbo = held_out(ours)

    theirs = made()
    theirs.load_state_dict(start)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = SVI(theirs.model, pyro_guide(name, theirs), pyro.optim.Adam({"lr": 0.01}), pyro_loss(name))
    for batch in batches:
        args, kwargs = call(batch)
        svi.step(*args, **kwargs)
    theirs_elbo = held_out(theirs)
    pyro.clear_param_store()
    # the mixture's MAP guide and summed-out assignments leave no randomness: the same steps, the same numbers
    tolerance = 1e-3 if name == "gmm" else 0.3 + 0.01 * abs(theirs_elbo)
    assert abs(ours_elbo - theirs_elbo) < tolerance, (
        f"{name}: pyro_lvm {ours_elbo:.3f}, stock Pyro {theirs_elbo:.3f}")
