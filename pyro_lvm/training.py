"""Training: a LightningModule around any Pyro model/guide pair and an ELBO estimator."""

from __future__ import annotations

import inspect
import os
import random
import warnings
from typing import Any, Callable, Optional, Union

import numpy as np
import pyro
import pytorch_lightning as pl
import torch
import torchmetrics
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import ELBO
from pyro.infer.elbo import ELBOModule
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import nn

from .callbacks import make_checkpoint_io_atomic, use_run_checkpoint
from .checkpoints import load_checkpoint
from .data import TensorDataModule, check_data
from .estimators import ESTIMATORS, BetaMixin, make_elbo
from .estimators.fast import FastLoss, fast_path_blocker
from .estimators.kl_control import Capacity, KLControl
from .monitoring import LatentMonitor
from .pairs import (
    accepting, call_keys, check_arguments, elbo_parts, enumerated_elbo_parts, enumerated_sites, is_pair_module,
    split_batch,
)
from .runs import check_run_folder
from .schedules import Constant, Schedule

__all__ = ["LVMModule", "HeldOutMean", "DivergedError", "elbo_terms", "fit"]

_BUFFER_PREFIX = "__baseline"  # Pyro keeps decaying-average baselines in the param store


def _escape(name: str) -> str:
    # nn.ParameterDict keys may not contain "."
    return name.replace(".", "/")


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the message says where and what to try."""


class HeldOutMean(torchmetrics.Metric):
    r"""A held-out term per data point over an epoch, global terms counted once.

    Each batch ``b`` adds the sum over its data points of their terms, :math:`L_b`, the global
    terms (sites outside the data plate), :math:`G_b`, and its size :math:`B_b`; the epoch's value
    over :math:`N = \sum_b B_b` points is :math:`\big(\sum_b L_b + \frac1{n_b}\sum_b G_b\big) / N`,
    whatever the batch size. Summed over processes under DDP.

    Example:
        >>> mean = HeldOutMean()
        >>> mean.update(torch.tensor(-10.0), torch.tensor(-3.0), 5)
        >>> mean.update(torch.tensor(-12.0), torch.tensor(-5.0), 5)
        >>> round(float(mean.compute()), 6)  # (-22 + (-4)) / 10
        -2.6
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("local", "shared", "count", "batches"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, local: torch.Tensor, shared: torch.Tensor, batch_size: int) -> None:
        self.local += local.double()
        self.shared += shared.double()
        self.count += batch_size
        self.batches += 1

    def compute(self) -> torch.Tensor:
        # summed in float64 over the epoch; logged in the default dtype, as the other metrics
        value = (self.local + self.shared / self.batches.clamp(min=1)) / self.count.clamp(min=1)
        return value.to(torch.get_default_dtype())


def _owner(fn: Any) -> Optional[nn.Module]:
    """The nn.Module behind a bound method such as ``vae.model``."""
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def elbo_terms(model: Callable, guide: Callable, *args, **kwargs) -> dict[str, torch.Tensor]:
    r"""One-sample Monte-Carlo estimate of the ELBO's two terms, per data point.

    Runs ``guide`` once, replays ``model`` against it, and returns
    ``reconstruction`` = :math:`\log p(x \mid z)` (observed sites),
    ``kl`` = :math:`\log q(z \mid x) - \log p(z)` (latent sites) and
    ``elbo`` = reconstruction - kl, each summed over the batch (the data points'
    terms without a subsampling plate's scale, global terms once; see
    :func:`pyro_lvm.pairs.elbo_parts`). The estimate is
    unbiased for any guide, whatever estimator trained it, so held-out values are
    comparable across estimators.

    Example:
        >>> import pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("x", dist.Normal(pyro.sample("z", dist.Normal(0., 1.)), 1.), obs=torch.tensor(0.))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(0., 1.))
        >>> t = elbo_terms(model, guide)
        >>> bool(torch.isclose(t["elbo"], t["reconstruction"] - t["kl"]))
        True
    """
    parts = elbo_parts(*_replayed_traces(model, guide, *args, **kwargs))
    reconstruction = parts["reconstruction"] + parts["global_reconstruction"]
    kl = parts["kl"] + parts["global_kl"]
    return {"elbo": reconstruction - kl, "reconstruction": reconstruction, "kl": kl}


def _replayed_traces(model: Callable, guide: Callable, *args, **kwargs):
    """A guide trace and the model's trace replayed against it, log-densities computed."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    return model_trace, guide_trace


class LVMModule(pl.LightningModule):
    r"""Train any Pyro model/guide pair with an ELBO estimator under Lightning.

    The seam is Pyro's :class:`~pyro.infer.elbo.ELBOModule`: the training loss is
    ``estimator.differentiable_loss(model, guide, x)`` divided by the batch size
    (nats per data point), minimized by one torch optimizer over every parameter
    of the pair. Lightning's ``Trainer`` then supplies progress bars,
    checkpoints and resume, early stopping, loggers and DDP.

    The pair can be

    * a module with ``model`` and ``guide`` methods, such as :class:`pyro_lvm.VAE`
      (a ``guide`` given as well replaces its own, e.g. one of :mod:`pyro_lvm.guides`);
    * two callables: ``PyroModule`` s, autoguides, bound methods, or plain
      functions that use ``pyro.param`` and ``pyro.module``.

    Pyro's global parameter store is never touched: the pair runs inside a
    private store (:meth:`pyro.params.param_store.ParamStoreDict.scope`), and
    every ``pyro.param`` it creates becomes a parameter of this module, so it is
    in the ``state_dict``, the optimizer, checkpoints and DDP. Lazily created
    parameters are made by one dry run on a training batch in :meth:`setup` (or
    call :meth:`initialize` yourself).

    Each batch is a tensor ``x``, a tuple (passed positionally), or a dict whose
    ``"x"`` is passed first and whose other keys (``"y"``, ``"index"``, ...) are
    passed by name to the model and to the guide, each getting those it names
    (:func:`pyro_lvm.pairs.call_keys`: a per-datapoint guide takes ``index``, the model
    need not; a Pyro autoguide gets what its model takes). ``rename`` maps a batch key to
    an argument of another name (Pyro's CVAE example calls its target ``ys``:
    ``rename={"y": "ys"}``). Before training, :meth:`initialize` refuses a pair that a batch
    would teach nothing: a model that observes nothing, or a batch key that reaches no
    argument while the model has one of a similar name.

    The held-out numbers (``val/*``, ``test/*``) are per data point and do not depend on the
    batch size: the terms of sites in the data plate (``data_plate``) are summed over the
    data, those of global sites (a factor model's weights) counted once per epoch (see
    :class:`HeldOutMean`).

    Logged: ``train/loss`` (``-ELBO_beta`` per data point), ``train/beta``,
    and with no gradient step ``val/elbo``, ``val/reconstruction``, ``val/kl``
    (the ELBO at ``beta = 1``, per data point; see :func:`elbo_terms`), and per
    epoch ``val/active_units``, ``val/beta`` and the KL per latent dimension
    (see ``latent_monitor``).
    A model with an ``evaluation_metrics(terms)`` method adds its own numbers (sums
    over the batch, logged per data point), e.g. :class:`pyro_lvm.FlowModel`'s ``bits_per_dim``.

    Arguments:
        model: the model, or a module with ``model`` and ``guide`` methods.
        guide: the guide (omit when ``model`` carries one).
        estimator: a name for :func:`pyro_lvm.estimators.make_elbo`
            (``"reparam"``, ``"iwae"``, ``"dreg"``, ``"score_function"``, ...) or any
            :class:`pyro.infer.ELBO` that has ``differentiable_loss``. A combination
            that cannot work (IWAE on a discrete latent, ...) fails here for the
            built-in models, and at the first batch for other pairs.
        num_particles: samples of ``z`` per data point (with a name only).
        beta: KL weight: a number or a :class:`pyro_lvm.schedules.Schedule` of the global step.
        lr: Adam's learning rate. Submodules with an ``own_lr`` attribute (a learned
            baseline, a per-datapoint guide) are trained at that rate instead. In
            :class:`pyro_lvm.cli.LVMCLI`, an ``optimizer:`` key replaces Adam and this rate;
            the ``own_lr`` groups keep theirs (see :meth:`parameter_groups`).
        estimator_options: further options of the named estimator, e.g.
            ``{"baseline": "nvil"}`` for ``"score_function"``.
        kl_control: :class:`~pyro_lvm.estimators.FreeBits` (a KL floor per latent
            dimension) or :class:`~pyro_lvm.estimators.Capacity` (:math:`\gamma|\mathrm{KL} - C(t)|`,
            which replaces ``beta``), for the ``"reparam"`` and ``"analytic_kl"`` estimators.
        latent_monitor: a :class:`~pyro_lvm.monitoring.LatentMonitor`, ``True`` for the
            default one, or ``False``: each validation epoch logs ``val/active_units``,
            ``val/beta`` and the KL per dimension, writes ``latent_stats.csv`` into the
            run folder, and warns (:class:`~pyro_lvm.monitoring.PosteriorCollapseWarning`)
            when the posterior collapses.
        fast_step: for a built-in model (whose ``model`` and ``guide`` are its own) with
            the ``"reparam"``, ``"analytic_kl"`` or ``"score_function"`` estimator and one
            particle, or ``"iwae"`` or ``"dreg"`` with any number (a Gaussian q and
            :math:`p(z) = \mathcal N(0, I)` for the last three), compute
            the training loss after the first step without Pyro's tracing
            (:class:`pyro_lvm.estimators.fast.FastLoss`): the same loss, gradients and random
            draws for the same seed, with Pyro's argument checks run once instead of every
            step (the data's values are checked on each epoch's first batch and every 50th). Other pairs and estimators run
            through Pyro whatever this says; ``fast_path_blocker`` names the reason.
        nonfinite: what a non-finite loss or gradient does: ``"stop"`` the run at once with a
            :class:`DivergedError` (the parameters stay those before the step), or ``"skip"`` the step
            (counted and logged as ``train/skipped_steps``); see :meth:`on_before_optimizer_step`.
        rename: batch key -> the argument of the model (and guide) that receives it.
        data_plate: the name of the pair's plate of independent data points (for the held-out
            numbers and the multi-sample estimators' per-point weights).

    Example:
        >>> from pyro_lvm import VAE
        >>> module = LVMModule(VAE(data_shape=4, latent_dim=2, hidden_dims=[8]), estimator="analytic_kl")
        >>> module.initialize(torch.bernoulli(torch.full((8, 4), 0.5)))
        >>> loss = module(torch.bernoulli(torch.full((8, 4), 0.5)))  # -ELBO per data point
        >>> loss.backward()
    """

    def __init__(
        self,
        model: Union[nn.Module, Callable],
        guide: Optional[Callable] = None,
        estimator: Union[str, ELBO] = "reparam",
        num_particles: int = 1,
        beta: Union[float, Schedule] = 1.0,
        lr: float = 1e-3,
        estimator_options: Optional[dict[str, Any]] = None,
        kl_control: Optional[KLControl] = None,
        latent_monitor: Union[bool, LatentMonitor] = True,
        fast_step: bool = True,
        rename: Optional[dict[str, str]] = None,
        data_plate: str = "data",
        nonfinite: str = "stop",
    ):
        super().__init__()
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' (end the run at a non-finite loss or gradient) or 'skip' "
                             f"(skip such steps); got {nonfinite!r}.")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        #: the run's model configuration as plain data (``pyro-lvm fit`` sets it from its YAML): a checkpoint
        #: written with another one is refused on resume, naming the keys that differ
        self.run_config: Optional[dict] = None
        if is_pair_module(model):
            self.lvm = model
            model, guide = model.model, (model.guide if guide is None else guide)
        elif guide is None:
            raise TypeError(
                f"Got model={type(model).__name__} and no guide. Pass a guide, or a module "
                "with model() and guide() methods such as pyro_lvm.VAE."
            )
        if callable(getattr(guide, "attach", None)):
            # pyro_lvm.guides build themselves from the model they approximate
            guide.attach(model, getattr(self, "lvm", None))
        # Modules behind the pair (e.g. the VAE behind vae.model, a guide module) are
        # registered here, so their parameters are in the state_dict and the optimizer.
        owners: list[nn.Module] = []
        for fn in (model, guide):
            owner = fn if isinstance(fn, nn.Module) else _owner(fn)
            if (
                owner is not None
                and owner is not getattr(self, "lvm", None)
                and all(owner is not o for o in owners)
            ):
                owners.append(owner)
        self.pair_modules = nn.ModuleList(owners)
        self.__dict__["_guide"] = guide  # not registered twice (it may be a module)

        if isinstance(estimator, str):
            options = dict(estimator_options or {})
            if kl_control is not None:
                if estimator not in ("reparam", "analytic_kl"):
                    raise ValueError(
                        f"kl_control needs the KL separated from the reconstruction, per latent "
                        f"dimension: use estimator 'reparam' or 'analytic_kl', not {estimator!r}."
                    )
                options["kl_control"] = kl_control
            cls = ESTIMATORS.get(estimator)
            if data_plate != "data" and cls is not None and "data_plate" in inspect.signature(cls).parameters:
                options.setdefault("data_plate", data_plate)  # the multi-sample estimators' per-point weights
            estimator = make_elbo(estimator, num_particles=num_particles, **options)
        elif num_particles != 1 or estimator_options:
            raise ValueError(
                "num_particles and estimator_options apply to an estimator given by name; "
                f"set them on the {type(estimator).__name__} you passed instead."
            )
        elif kl_control is not None:
            if not hasattr(estimator, "_init_kl_control"):
                raise ValueError(
                    f"kl_control needs an estimator with a separable KL (pyro_lvm's 'reparam' or "
                    f"'analytic_kl'); {type(estimator).__name__} has none."
                )
            estimator._init_kl_control(kl_control)
        if not hasattr(estimator, "differentiable_loss"):
            raise TypeError(
                f"{type(estimator).__name__} has no differentiable_loss; use a pyro_lvm estimator "
                "(pyro_lvm.estimators.make_elbo) or a Pyro ELBO that has one."
            )
        self.estimator = estimator
        # learned baselines and the like: trained with the pair, checkpointed with it
        self.estimator_modules = nn.ModuleList(
            estimator.trainable_modules() if hasattr(estimator, "trainable_modules") else []
        )
        if not isinstance(beta, Schedule) and not float(beta) >= 0:
            raise ValueError(f"beta (the weight of the KL term) must be >= 0 (0: reconstruction alone); got {beta}. "
                             "For a weight that changes with the step, pass a pyro_lvm.schedules.Schedule.")
        self.beta_schedule = beta if isinstance(beta, Schedule) else Constant(float(beta))
        self.kl_control = getattr(estimator, "kl_control", None)
        if isinstance(self.kl_control, Capacity) and not (
            isinstance(self.beta_schedule, Constant) and self.beta_schedule.value == 1.0
        ):
            raise ValueError(
                "Capacity control replaces beta (its gamma weighs |KL - C|); leave beta at 1."
            )
        if latent_monitor is True:
            latent_monitor = LatentMonitor()
        self.latent_monitor: Optional[LatentMonitor] = latent_monitor or None
        if not isinstance(estimator, BetaMixin) and not (
            isinstance(self.beta_schedule, Constant) and self.beta_schedule.value == 1.0
        ):
            raise ValueError(
                f"beta needs an estimator with a KL weight; {type(estimator).__name__} has none. "
                "Use a pyro_lvm estimator (pyro_lvm.estimators.make_elbo) or beta=1."
            )
        self.lr = lr
        # each callable gets the batch entries it names ("index" for a per-datapoint guide; an
        # autoguide what its model takes): see pyro_lvm.pairs.call_keys
        self._model_keys = call_keys(model)
        self._guide_keys = call_keys(guide, model)
        self.__dict__["_pair_model"] = model
        self.rename = dict(rename or {})
        self.data_plate = data_plate
        self.objective = ELBOModule(accepting(model, self._model_keys), accepting(guide, self._guide_keys), estimator)
        self.fast_step = fast_step
        # the held-out ELBO and its terms, one running mean per stage and term (no state in checkpoints)
        self.held_out = nn.ModuleDict()
        self._enumerated: Optional[list] = None  # model sites summed out by enumeration (found at the first batch)
        self._enum_elbo = None
        self._fast_elbo = None
        self._fast_for(estimator)
        self.pyro_params = nn.ParameterDict()
        self._param_state: dict = {"params": {}, "constraints": {}}
        self._initialized = False
        lvm = getattr(self, "lvm", None)
        example = getattr(lvm, "example_batch", None)
        if callable(example) and hasattr(estimator, "check") and guide == getattr(lvm, "guide", None):
            # a built-in model knows its data shape: wrong combinations fail here
            with torch.no_grad(), self._scope():
                estimator.check(self.objective.model, self.objective.guide, example())

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: Optional[bool] = None, weights_only: Optional[bool] = None, **kwargs: Any):
        """Lightning's ``load_from_checkpoint``, reading tensors and plain data only (``weights_only=True``).

        A pyro_lvm checkpoint holds nothing else, so no pickled code ever runs, whatever torch's default
        or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say; ``weights_only=False`` is refused. Without a
        ``model`` argument, a built-in model is rebuilt from the checkpoint
        (:func:`pyro_lvm.checkpoints.model_from_checkpoint`); a user's own pair is passed as ``model``
        (and ``guide``), as built for training.

        Example:
            >>> import tempfile, pytorch_lightning as pl
            >>> from pyro_lvm import VAE
            >>> module = LVMModule(VAE(data_shape=4, latent_dim=2, hidden_dims=[8]))
            >>> module.initialize(torch.zeros(2, 4))
            >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
            >>> trainer.strategy.connect(module)
            >>> path = tempfile.mkdtemp() + "/vae.ckpt"
            >>> trainer.save_checkpoint(path)
            >>> loaded = LVMModule.load_from_checkpoint(path)   # the VAE rebuilt from the checkpoint
            >>> torch.equal(loaded.lvm.decoder[0].weight, module.lvm.decoder[0].weight)
            True
        """
        if weights_only is False:
            raise ValueError(
                "pyro_lvm checkpoints hold tensors and plain data only and load with weights_only=True, which runs "
                "no pickled code; weights_only=False is refused (a crafted checkpoint could run anything)."
            )
        if not hasattr(checkpoint_path, "read"):
            checkpoint = load_checkpoint(checkpoint_path)  # a message for a missing, corrupt, foreign or pickled file
            if "model" not in kwargs:
                from .checkpoints import model_from_checkpoint

                kwargs["model"] = model_from_checkpoint(checkpoint)
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, weights_only=True,
                                            **kwargs)

    # ----- the trained pair, as a pair -------------------------------------------------
    def model(self, *args, **kwargs):
        """The pair's model, run with this module's parameters (its private parameter store).

        Keyword arguments go by batch key (``rename`` applies) to the model's arguments it names,
        so that every check takes the trained module as a pair:
        ``pyro_lvm.evaluate(module, x)``, ``psis_khat(module, x=x)``, ``to_inference_data(module, x=x)``.
        """
        with self._scope():
            return self.objective.model(*args, **{self.rename.get(k, k): v for k, v in kwargs.items()})

    def guide(self, *args, **kwargs):
        """The pair's guide, run with this module's parameters (see :meth:`model`)."""
        with self._scope():
            return self.objective.guide(*args, **{self.rename.get(k, k): v for k, v in kwargs.items()})

    @property
    def vectorization(self):
        """How a multi-sample estimator runs its particles, decided on the first batch
        (:class:`pyro_lvm.pairs.Vectorization`: truthy when vectorized, ``reason`` says why);
        ``None`` for an estimator without that choice."""
        return getattr(self.estimator, "vectorization", None)

    # ----- the pair's parameters --------------------------------------------------
    def _scope(self):
        return pyro.get_param_store().scope(state=self._param_state)

    def _inputs(self, batch: Any) -> tuple[tuple, dict, int]:
        return split_batch(batch, self.rename)

    @torch.no_grad()
    def initialize(self, batch: Any) -> None:
        """Create lazily initialized parameters by one dry run of the pair on ``batch``, and check the pair.

        Afterwards every parameter the pair uses is a parameter of this module. The checks
        refuse, before any training, a pair that would learn nothing from such batches
        (:func:`pyro_lvm.pairs.check_arguments`) and a combination the estimator cannot work
        on; a multi-particle estimator decides here whether its particles run vectorized
        (see :attr:`vectorization`). Safe to call more than once.
        """
        args, kwargs, _ = self._inputs(batch)
        with self._scope():
            model_trace, _ = _replayed_traces(self.objective.model, self.objective.guide, *args, **kwargs)
            keys = list(batch) if isinstance(batch, dict) else ["x"]
            check_arguments(self.__dict__["_pair_model"], keys, model_trace, self.rename, guide_keys=self._guide_keys)
            if hasattr(self.estimator, "check"):
                self.estimator.check(self.objective.model, self.objective.guide, *args, **kwargs)
        owned = {id(p) for p in self.parameters()}
        params = self._param_state["params"]
        for name, value in list(params.items()):
            if name.startswith(_BUFFER_PREFIX) or id(value) in owned:
                continue
            if not isinstance(value, nn.Parameter):
                value = params[name] = nn.Parameter(value.detach())
            self.pyro_params[_escape(name)] = value
            owned.add(id(value))
        self._initialized = True

    def setup(self, stage: str) -> None:
        if stage == "fit":
            make_checkpoint_io_atomic(self.trainer)  # every checkpoint of the run: a whole file or none
            self.check_data_module(getattr(self.trainer, "datamodule", None))
        if self._initialized:
            return
        loader = self._dataloader(stage)
        set_num_data = getattr(self._guide, "set_num_data", None)
        if callable(set_num_data):
            # a per-datapoint guide sizes its table from the training set
            train = loader if stage == "fit" else self._train_loader()
            try:
                set_num_data(len(train.dataset))
            except (TypeError, AttributeError):
                pass  # no training set with a length: the guide must be told num_data
        try:
            batch = next(iter(loader))
        except Exception as err:
            raise RuntimeError(
                f"LVMModule could not draw a batch from the {stage} data to create the pair's "
                "lazily initialized parameters; call module.initialize(batch) before the Trainer."
            ) from err
        training = self.training
        self.train(stage == "fit")  # e.g. a per-datapoint guide treats held-out data differently
        try:
            self.initialize(batch)
        finally:
            self.train(training)

    def check_data_module(self, datamodule: Any) -> None:
        """Check every row of a pyro_lvm data module's splits, as the model will see them (before training).

        The model's ``check_data`` (shape, the likelihood's support), naming the first bad row by its
        position in the source data; splits binarized on the way to the model are binary whatever they
        hold. :meth:`setup` calls it once, and ``pyro-lvm fit`` before it writes anything. Other data
        modules are checked batch by batch, as they come.
        """
        check = getattr(getattr(self, "lvm", None), "check_data", None)
        if not callable(check) or datamodule is None or not isinstance(getattr(type(datamodule), "datasets", None), property):
            return
        sources = getattr(datamodule, "source_index", {})
        for split, dataset in datamodule.datasets.items():
            x = getattr(dataset, "x", None)
            if isinstance(x, torch.Tensor) and getattr(dataset, "binarize", "none") == "none":
                check(x, f"{type(datamodule).__name__}'s {split} split (rows of the source data)", rows=sources.get(split))

    def _train_loader(self) -> Any:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return None
        try:
            datamodule.setup("fit")
            return datamodule.train_dataloader()
        except Exception:
            return None

    def _dataloader(self, stage: str) -> Any:
        trainer = self.trainer
        loop = {
            "fit": trainer.fit_loop, "validate": trainer.validate_loop,
            "test": trainer.test_loop, "predict": trainer.predict_loop,
        }[stage]
        # the data module's or the loaders' source that the Trainer was given
        loader = loop._data_source.dataloader()
        return loader[0] if isinstance(loader, (list, tuple)) else loader

    # ----- steps -------------------------------------------------------------------
    def forward(self, batch: Any) -> torch.Tensor:
        """The training loss ``-ELBO_beta`` per data point, differentiable.

        For a built-in model with an estimator that has a fast path (``fast_step``), every
        call after the first computes the same loss without Pyro's tracing
        (:class:`pyro_lvm.estimators.fast.FastLoss`; see ``fast_step``).
        """
        args, kwargs, batch_size = self._inputs(batch)
        fast = self._fast_for(self.objective.elbo)
        if fast is not None and self._pyro_steps > 0 and len(args) == 1 and not self._model_keys.intersection(kwargs):
            with self._scope():
                return self._fast(args[0]) / batch_size
        with self._scope():
            loss = self.objective(*args, **kwargs) / batch_size
        self._pyro_steps += 1
        return loss

    def _fast_for(self, estimator: ELBO) -> Optional[FastLoss]:
        """The fast loss for ``estimator``, rebuilt when the estimator was swapped (the next
        step then runs through Pyro first, which checks the pair with the new estimator)."""
        if self._fast_elbo is not estimator:
            self._fast_elbo = estimator
            lvm = getattr(self, "lvm", None)
            self.fast_path_blocker = (
                fast_path_blocker(lvm, self._guide, estimator) if self.fast_step else "fast_step=False"
            )
            self._fast = FastLoss(lvm, estimator) if self.fast_path_blocker is None else None
            self._pyro_steps = 0  # training losses computed through Pyro (the first one checks everything)
        return self._fast

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        beta = self.beta_schedule(self.global_step)
        self.estimator.beta = beta
        if hasattr(self.estimator, "set_step"):  # e.g. a temperature schedule
            self.estimator.set_step(self.global_step)
        loss = self(batch)
        self._last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/beta", beta, on_step=True, on_epoch=False)
        if self.kl_control is not None:
            for key, value in self.kl_control.state().items():  # e.g. the capacity C(t)
                self.log(f"train/{key}", value, on_step=True, on_epoch=False)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        """One held-out batch: the ELBO's terms, added to the epoch's :class:`HeldOutMean` s."""
        args, kwargs, batch_size = self._inputs(batch)
        with self._scope():
            traces = _replayed_traces(self.objective.model, self.objective.guide, *args, **kwargs)
            if self._enumerated is None:
                self._enumerated = enumerated_sites(*traces)
            if self._enumerated:  # sites the model sums out: the ELBO of TraceEnum_ELBO, no separate terms
                if self._enum_elbo is None:
                    from pyro.infer import TraceEnum_ELBO

                    self._enum_elbo = TraceEnum_ELBO()
                enum = enumerated_elbo_parts(self.objective.model, self.objective.guide, args, kwargs,
                                             self.data_plate, self._enum_elbo)
        if self.latent_monitor is not None and not self.trainer.sanity_checking:
            self.latent_monitor.update(*traces)
        if self._enumerated:
            local, shared = {"elbo": enum["elbo"]}, {"elbo": enum["global_elbo"]}
        else:
            parts = elbo_parts(*traces, data_plate=self.data_plate)
            local = {"reconstruction": parts["reconstruction"], "kl": parts["kl"]}
            shared = {"reconstruction": parts["global_reconstruction"], "kl": parts["global_kl"]}
            for terms in (local, shared):
                terms["elbo"] = terms["reconstruction"] - terms["kl"]
        extra = getattr(getattr(self, "lvm", None), "evaluation_metrics", None)
        if callable(extra):  # e.g. a flow's bits per dimension (linear in the terms)
            local.update(extra(local))
            shared.update(extra(shared))
        for key, value in local.items():
            name = f"{stage}/{key}"
            key_ = name.replace("/", "_")
            if key_ not in self.held_out:
                self.held_out[key_] = HeldOutMean().to(value.device)
            metric = self.held_out[key_]
            metric.update(value.detach(), shared[key].detach(), batch_size)
            self.log(name, metric, prog_bar=stage == "val" and key == "elbo", on_step=False, on_epoch=True,
                     batch_size=batch_size, metric_attribute=f"held_out.{key_}")
        return {key: value for key, value in local.items() if key in ("elbo", "reconstruction", "kl")}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "test")

    # ----- the latent code, each epoch ---------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.latent_monitor is not None:
            self.latent_monitor.reset()

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._end_latent_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_latent_epoch("test")

    def _end_latent_epoch(self, stage: str) -> None:
        monitor = self.latent_monitor
        if monitor is None or self.trainer.sanity_checking:
            return
        strategy = self.trainer.strategy
        summary = monitor.end_epoch(
            self.current_epoch, self.global_step, float(self.estimator.beta),
            reduce=lambda t: strategy.reduce(t, reduce_op="sum"),
            warn=stage == "val" and self.trainer.is_global_zero,
        )
        if summary["num_units"] == 0:
            return
        metrics = monitor.metrics(summary, prefix=stage)
        metrics[f"{stage}/beta"] = float(self.estimator.beta)
        # already summed over processes: every rank logs the same numbers
        self.log_dict(metrics, on_step=False, on_epoch=True)
        if stage == "val" and self.trainer.is_global_zero and self.trainer.logger is not None:
            log_dir = self.trainer.logger.log_dir
            if log_dir is not None:
                os.makedirs(log_dir, exist_ok=True)
                monitor.write_csv(summary, os.path.join(log_dir, "latent_stats.csv"))

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups: every parameter once, a submodule's own rate kept.

        The first group holds the parameters trained at the optimizer's rate; each
        submodule with an ``own_lr`` attribute (a learned baseline, the tables of a
        per-datapoint guide) adds a group ``{"params": ..., "lr": own_lr}``. Both
        :meth:`configure_optimizers` and LightningCLI's ``optimizer:`` key (through
        :class:`pyro_lvm.cli.LVMCLI`) build their optimizer on these groups.

        Example:
            >>> from pyro_lvm import VAE
            >>> module = LVMModule(VAE(data_shape=4, latent_dim=2, hidden_dims=[8]),
            ...                    estimator="score_function", estimator_options={"baseline": "nvil"})
            >>> [group.get("lr") for group in module.parameter_groups()]
            [None, 0.003]
        """
        groups: list[dict] = []
        claimed: set[int] = set()
        for module in self.modules():
            own_lr = getattr(module, "own_lr", None)
            if own_lr is None or module is self:
                continue
            params = [p for p in module.parameters() if id(p) not in claimed]
            claimed.update(map(id, params))
            if params:
                groups.append({"params": params, "lr": float(own_lr)})
        rest = [p for p in self.parameters() if id(p) not in claimed]
        return [{"params": rest}, *groups]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam at ``lr`` over :meth:`parameter_groups` (a submodule's ``own_lr`` kept)."""
        return torch.optim.Adam(self.parameter_groups(), lr=self.lr)

    # ----- divergence ---------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The divergence guard: a non-finite loss or gradient never reaches the parameters.

        With ``nonfinite="stop"`` (the default) the run stops at once with a
        :class:`DivergedError` that names the step, the learning rate, the last good checkpoint and
        what to try; the parameters are those before the step. With ``"skip"`` the step is skipped
        (no parameter or optimizer state changes), counted in :attr:`skipped_steps` and logged as
        ``train/skipped_steps``. One host sync per step.
        """
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss = getattr(self, "_last_loss", None)
        checks = [torch.isfinite(g).all() for g in grads]
        if loss is not None:
            checks.append(torch.isfinite(loss).all())
        if not checks or bool(torch.stack(checks).all()):
            return
        if self.nonfinite == "skip":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # Adam leaves a parameter without a gradient (and its state) as it is
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            return
        raise DivergedError(self._divergence_message(optimizer, loss))

    def _divergence_message(self, optimizer: torch.optim.Optimizer, loss: Optional[torch.Tensor]) -> str:
        lr = optimizer.param_groups[0].get("lr")
        what = (f"the loss is {float(loss):.4g}" if loss is not None and not torch.isfinite(loss).all()
                else "a gradient is not finite")
        trainer = self._trainer
        last = getattr(getattr(trainer, "checkpoint_callback", None), "last_model_path", "") if trainer else ""
        where = f"The last good checkpoint: {last}." if last else "No checkpoint was written yet."
        return (
            f"Training diverged at step {self.global_step} (epoch {self.current_epoch}): {what}, with learning rate "
            f"{lr}. The parameters are those before this step (nothing non-finite was applied or saved). {where} "
            f"Try a smaller learning rate (lr={lr / 10 if isinstance(lr, float) else lr}), gradient clipping "
            "(Trainer(gradient_clip_val=...)), a KL warm-up (beta=pyro_lvm.schedules.LinearWarmup(...)), a check of "
            "the data for extreme values; or skip such steps with nonfinite='skip' (counted in train/skipped_steps)."
        )

    def on_train_epoch_start(self) -> None:
        if self._fast is not None:
            self._fast.check_next = True  # the fast step checks the data's values again

    # ----- reproducibility -------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Re-seed from (seed, epoch, rank) at each epoch's first step, so that a run
        # resumed from an end-of-epoch checkpoint draws exactly the numbers of an
        # uninterrupted run. (At on_train_epoch_start the first epoch after a resume
        # would differ: its data iterator already exists and has drawn from the RNG.)
        seed = os.environ.get("PL_GLOBAL_SEED")
        if batch_idx != 0 or seed is None:
            return
        state = np.random.SeedSequence(
            [int(seed), self.current_epoch, self.global_rank]
        ).generate_state(2)
        torch.manual_seed(int(state[0]))
        np.random.seed(int(state[1]))
        random.seed(int(state[1]))

    # ----- checkpoints ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        info: dict[str, Any] = {
            "format": 1,
            "buffers": {
                k: v.detach().cpu()
                for k, v in self._param_state["params"].items()
                if k.startswith(_BUFFER_PREFIX)
            },
        }
        if hasattr(self.estimator, "state_dict"):  # e.g. running-average baselines
            info["estimator"] = {
                k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                for k, v in self.estimator.state_dict().items()
            }
        lvm = getattr(self, "lvm", None)
        if lvm is not None and hasattr(lvm, "config"):
            info["model"] = {"class": f"{type(lvm).__module__}.{type(lvm).__qualname__}", "config": lvm.config}
        if self.run_config is not None:
            info["run_config"] = self.run_config
        # which path the next step takes: a resumed run takes the one an uninterrupted run would
        info["steps"] = {"pyro_steps": int(self._pyro_steps), "skipped_steps": int(self.skipped_steps)}
        checkpoint["pyro_lvm"] = info

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get("pyro_lvm")
        if info is None or "state_dict" not in checkpoint:
            raise ValueError(
                "This checkpoint was not written by pyro_lvm.LVMModule (no 'pyro_lvm' entry). "
                "Resume from a checkpoint of a pyro_lvm run."
            )
        differences = self._config_differences(info)
        if differences:
            raise ValueError(
                "This checkpoint was written by another model configuration; it differs in "
                + "; ".join(differences[:8]) + (f" (and {len(differences) - 8} more)" if len(differences) > 8 else "")
                + ". Resume with the run's own configuration (its run folder has config.yaml), or start a new run "
                "(without ckpt_path) for the new model."
            )
        ours = self.state_dict()
        theirs = checkpoint["state_dict"]
        missing = sorted(set(ours) - set(theirs))
        unexpected = sorted(set(theirs) - set(ours))
        shapes = sorted(
            f"{k}: {tuple(theirs[k].shape)} in checkpoint vs {tuple(ours[k].shape)} here"
            for k in set(ours) & set(theirs)
            if tuple(ours[k].shape) != tuple(theirs[k].shape)
        )
        if missing or unexpected or shapes:
            lvm = getattr(self, "lvm", None)
            here = getattr(lvm, "config", None)
            there = info.get("model", {}).get("config")
            raise ValueError(
                "Checkpoint does not match this model"
                + (f" (checkpoint config {there}, this model {here})" if there != here else "")
                + ". "
                + "; ".join(
                    part
                    for part in (
                        f"missing: {missing[:5]}" if missing else "",
                        f"unexpected: {unexpected[:5]}" if unexpected else "",
                        f"shape mismatch: {shapes[:5]}" if shapes else "",
                    )
                    if part
                )
                + ". Build the model with the checkpoint's configuration (its run folder has config.yaml)."
            )
        for name, value in info.get("buffers", {}).items():
            self._param_state["params"][name] = value
            self._param_state["constraints"][name] = constraints.real
        if "estimator" in info and hasattr(self.estimator, "load_state_dict"):
            self.estimator.load_state_dict(info["estimator"])
        steps = info.get("steps", {})
        self._fast_for(self.estimator)
        self._pyro_steps = int(steps.get("pyro_steps", self._pyro_steps))
        self.skipped_steps = int(steps.get("skipped_steps", 0))

    def _config_differences(self, info: dict) -> list[str]:
        """The keys (with both values) where the checkpoint's model configuration differs from this one's."""
        out = []
        lvm = getattr(self, "lvm", None)
        stored = info.get("model")
        if isinstance(stored, dict) and lvm is not None and hasattr(lvm, "config"):
            here = f"{type(lvm).__module__}.{type(lvm).__qualname__}"
            if stored.get("class") != here:
                out.append(f"model class: {stored.get('class')} in the checkpoint, {here} here")
            else:
                out += _differences(stored.get("config"), lvm.config, "model.")
        if info.get("run_config") is not None and self.run_config is not None:
            out += [d for d in _differences(info["run_config"], self.run_config, "") if d not in out]
        return out


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: configurations compare by value, whatever container wrote them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _differences(there: Any, here: Any, prefix: str) -> list[str]:
    """``key: A in the checkpoint, B here`` for every key where two configurations differ."""
    there, here = _plain(there), _plain(here)
    if isinstance(there, dict) and isinstance(here, dict):
        out = []
        for key in sorted(set(there) | set(here), key=str):
            a, b = there.get(key, "<absent>"), here.get(key, "<absent>")
            out += _differences(a, b, f"{prefix}{key}.")
        return out
    return [] if there == here else [f"{prefix.rstrip('.')}: {there!r} in the checkpoint, {here!r} here"]


def fit(
    model: Union[nn.Module, Callable],
    guide: Optional[Callable] = None,
    data: Union[pl.LightningDataModule, torch.Tensor, None] = None,
    estimator: Union[str, ELBO] = "reparam",
    num_particles: int = 1,
    beta: Union[float, Schedule] = 1.0,
    lr: float = 1e-3,
    estimator_options: Optional[dict[str, Any]] = None,
    kl_control: Optional[KLControl] = None,
    latent_monitor: Union[bool, LatentMonitor] = True,
    seed: Optional[int] = 0,
    ckpt_path: Optional[str] = None,
    rename: Optional[dict[str, str]] = None,
    data_plate: str = "data",
    **trainer_kwargs: Any,
) -> LVMModule:
    """Train a model/guide pair in one call and return the trained :class:`LVMModule`.

    The arguments from ``model`` to ``latent_monitor``, ``rename`` and ``data_plate`` are those
    of :class:`LVMModule`.

    ``data`` is a Lightning data module or a tensor with one row per data point,
    of which a random tenth (seeded by ``seed``) is held out for the validation
    ELBO. ``trainer_kwargs`` go to :class:`pytorch_lightning.Trainer`
    (``max_epochs``, ``accelerator``, ``devices``, ``strategy``, ``callbacks``, ...);
    the trainer stays reachable as ``module.trainer``. ``ckpt_path`` resumes a
    run from its checkpoint (loaded with ``weights_only=True``); with the same
    ``seed`` the result equals an uninterrupted run. ``seed`` seeds training, not
    the model's initial weights, which exist before ``fit`` is called: seed
    (``pytorch_lightning.seed_everything``) before building the model for
    identical initial weights.

    Example:
        >>> import pyro.distributions as dist
        >>> def model(x):                          # z ~ N(loc, I), x ~ N(z, I)
        ...     loc = pyro.param("loc", torch.zeros(2))
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(loc, 1.).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 1.).to_event(1), obs=x)
        >>> def guide(x):                          # the exact posterior N((x + loc) / 2, I / 2)
        ...     loc = pyro.param("loc", torch.zeros(2))
        ...     with pyro.plate("data", x.shape[0]):
        ...         pyro.sample("z", dist.Normal((x + loc) / 2, 0.5 ** 0.5).to_event(1))
        >>> x = torch.randn(256, 2) + 3.0
        >>> module = fit(model, guide, data=x, lr=0.1, max_epochs=100, enable_progress_bar=False,
        ...              logger=False, enable_checkpointing=False, enable_model_summary=False)
        >>> bool((module.pyro_params["loc"] - x.mean(0)).abs().max() < 0.3)  # the MLE of loc
        True
    """
    if seed is not None:
        pl.seed_everything(seed, verbose=False)
    if isinstance(data, np.ndarray):
        data = torch.as_tensor(data)
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or len(data) == 0:
            raise ValueError(f"fit() needs at least one data point (a tensor with one row per point); got shape "
                             f"{tuple(data.shape)}.")
        check_data(data, "data")  # before the split: a bad value's index is the row the user knows
        check_rows = getattr(model, "check_data", None)
        if callable(check_rows):  # a built-in model: shape and support of every row, by the user's row
            check_rows(data, "data")
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed or 0))
        n_val = max(1, len(data) // 10) if len(data) > 1 else 0  # one point: all of it to train on
        data = TensorDataModule(data[order[n_val:]], val=data[order[:n_val]] if n_val else None)
    if data is None:
        raise ValueError("fit() needs data: a LightningDataModule or a tensor of data points.")
    if not isinstance(data, pl.LightningDataModule):
        raise TypeError(f"fit() takes data as a tensor (or NumPy array) with one row per data point, or a "
                        f"LightningDataModule; got {type(data).__name__}.")
    module = LVMModule(
        model, guide, estimator=estimator, num_particles=num_particles, beta=beta, lr=lr,
        estimator_options=estimator_options, kl_control=kl_control, latent_monitor=latent_monitor,
        rename=rename, data_plate=data_plate,
    )
    if ckpt_path is not None:
        load_checkpoint(ckpt_path)
    trainer = pl.Trainer(**trainer_kwargs)
    use_run_checkpoint(trainer)  # last.ckpt at every epoch and the best one, written atomically
    logger = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None):
        check_run_folder(logger.log_dir, ckpt_path)  # an explicit version that holds a run is not written over
    with warnings.catch_warnings():
        if not is_overridden("val_dataloader", data, pl.LightningDataModule):  # data without a held-out split: fine
            warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return module
