"""The LightningModule that trains any Pyro model/guide pair with an ELBO estimator."""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Optional, Union

import numpy as np
import pyro
import pytorch_lightning as pl
import torch
from pyro.distributions import constraints
from pyro.infer import ELBO
from pyro.infer.elbo import ELBOModule
from torch import nn

from ..estimators import BetaMixin, as_estimator, refusing_moved_options
from ..estimators.kl_control import Capacity
from ..pairs import (
    accepting,
    call_keys,
    check_arguments,
    is_pair_module,
    split_batch,
)
from ..schedules import Constant, Schedule
from .callbacks import make_checkpoint_io_atomic
from .checkpoints import load_checkpoint, model_from_checkpoint
from .divergence import DivergedError, all_finite, check_nonfinite_option, divergence_message, drop_gradients
from .fast_step import FastLoss, fast_path_blocker
from .held_out import HeldOutMean, HeldOutTerms, replayed_traces
from .monitor import LatentMonitor
from .state import config_differences, state_mismatch

__all__ = ["LVMModule"]

_BUFFER_PREFIX = "__baseline"  # Pyro keeps decaying-average baselines in the param store


def _escape(name: str) -> str:
    # nn.ParameterDict keys may not contain "."
    return name.replace(".", "/")




def pair_owners(model: Callable, guide: Callable, exclude: Optional[nn.Module] = None) -> list[nn.Module]:
    """The distinct modules behind a pair's callables (the callable itself, or the module of a bound method)."""
    owners: list[nn.Module] = []
    for fn in (model, guide):
        owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module) and owner is not exclude and all(owner is not o for o in owners):
            owners.append(owner)
    return owners


def beta_schedule(beta: Union[float, Schedule], estimator: ELBO) -> Schedule:
    """``beta`` as a schedule of the step, checked against what the estimator can weigh."""
    if not isinstance(beta, Schedule) and not float(beta) >= 0:
        raise ValueError(f"beta (the weight of the KL term) must be >= 0 (0: reconstruction alone); got {beta}. "
                         "For a weight that changes with the step, pass a pyro_lvm.schedules.Schedule.")
    schedule = beta if isinstance(beta, Schedule) else Constant(float(beta))
    unweighted = isinstance(schedule, Constant) and schedule.value == 1.0
    if isinstance(getattr(estimator, "kl_control", None), Capacity) and not unweighted:
        raise ValueError("Capacity control replaces beta (its gamma weighs |KL - C|); leave beta at 1.")
    if not isinstance(estimator, BetaMixin) and not unweighted:
        raise ValueError(
            f"beta needs an estimator with a KL weight; {type(estimator).__name__} has none. "
            "Use a pyro_lvm estimator (pyro_lvm.estimators) or beta=1."
        )
    return schedule


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

    Logged: ``train/loss_epoch`` (the epoch's mean ``-ELBO_beta`` per data point) and, at the steps whose
    metrics Lightning writes (every ``log_every_n_steps``), ``train/loss_step`` and ``train/beta``,
    and with no gradient step ``val/elbo``, ``val/reconstruction``, ``val/kl``
    (the ELBO at ``beta = 1``, per data point; see :func:`elbo_terms`), and per
    epoch ``val/active_units``, ``val/beta`` and the KL per latent dimension
    (see ``latent_monitor``).
    A model with an ``evaluation_metrics(terms)`` method adds its own numbers (sums
    over the batch, logged per data point), e.g. :class:`pyro_lvm.FlowModel`'s ``bits_per_dim``; so does one
    with ``held_out_metrics(x, ...)``, from the batch entries it names (:class:`pyro_lvm.SemiSupervisedVAE`'s ``error``).

    Arguments:
        model: the model, or a module with ``model`` and ``guide`` methods.
        guide: the guide (omit when ``model`` carries one).
        estimator: the estimator, an object that carries its own options (number of particles,
            baseline, KL control): any :mod:`pyro_lvm.estimators` estimator, e.g.
            ``pyro_lvm.estimators.IWAEELBO(num_particles=5)`` (in YAML, ``estimator: {class_path:
            pyro_lvm.estimators.IWAEELBO, init_args: {num_particles: 5}}``), or a Pyro
            :class:`pyro.infer.ELBO` that has ``differentiable_loss``; or a name as a shorthand for
            the estimator with its defaults (``"reparam"``, ``"analytic_kl"``, ``"iwae"``, ...; see
            :func:`pyro_lvm.estimators.as_estimator`). A combination that cannot work (IWAE on a
            discrete latent, ...) fails here for the built-in models, and at the first batch for
            other pairs. The keywords ``num_particles``, ``estimator_options`` and ``kl_control``
            of earlier versions are refused with the new spelling.
        beta: KL weight: a number or a :class:`pyro_lvm.schedules.Schedule` of the global step
            (the module's, not the estimator's: an estimator built with another ``beta`` is refused).
        lr: Adam's learning rate. Submodules with an ``own_lr`` attribute (a learned
            baseline, a per-datapoint guide) are trained at that rate instead. In
            :class:`pyro_lvm.cli.fit.LVMCLI`, an ``optimizer:`` key replaces Adam and this rate;
            the ``own_lr`` groups keep theirs (see :meth:`parameter_groups`).
        latent_monitor: a :class:`~pyro_lvm.training.monitor.LatentMonitor`, ``True`` for the
            default one, or ``False``: each validation epoch logs ``val/active_units``,
            ``val/beta`` and the KL per dimension, writes ``latent_stats.csv`` into the
            run folder, and warns (:class:`~pyro_lvm.training.monitor.PosteriorCollapseWarning`)
            when the posterior collapses.
        fast_step: for a built-in model (whose ``model`` and ``guide`` are its own) with
            the ``"reparam"``, ``"analytic_kl"`` or ``"score_function"`` estimator and one
            particle, or ``"iwae"`` or ``"dreg"`` with any number (a Gaussian q and
            :math:`p(z) = \mathcal N(0, I)` for the last three), compute
            the training loss after the first step without Pyro's tracing
            (:class:`pyro_lvm.training.fast_step.FastLoss`): the same loss, gradients and random
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

    @refusing_moved_options
    def __init__(
        self,
        model: Union[nn.Module, Callable],
        guide: Optional[Callable] = None,
        estimator: Union[ELBO, str] = "reparam",
        *,
        beta: Union[float, Schedule] = 1.0,
        lr: float = 1e-3,
        latent_monitor: Union[bool, LatentMonitor] = True,
        fast_step: bool = True,
        rename: Optional[dict[str, str]] = None,
        data_plate: str = "data",
        nonfinite: str = "stop",
    ):
        super().__init__()
        self.nonfinite = check_nonfinite_option(nonfinite)
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
        lvm = getattr(self, "lvm", None)
        if callable(getattr(guide, "attach", None)):
            guide.attach(model, lvm)  # pyro_lvm.guides build themselves from the model they approximate
        # the modules behind the pair (a guide module, the VAE behind vae.model) are registered here, so their
        # parameters are in the state_dict and the optimizer
        self.pair_modules = nn.ModuleList(pair_owners(model, guide, exclude=lvm))
        self.__dict__["_guide"] = guide  # not registered twice (it may be a module)
        self.estimator = estimator = as_estimator(estimator, data_plate)
        # learned baselines and the like: trained with the pair, checkpointed with it
        self.estimator_modules = nn.ModuleList(getattr(estimator, "trainable_modules", list)())
        self.beta_schedule = beta_schedule(beta, estimator)
        self.kl_control = getattr(estimator, "kl_control", None)
        self.latent_monitor: Optional[LatentMonitor] = LatentMonitor() if latent_monitor is True else latent_monitor or None
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
        self.held_out_terms = HeldOutTerms(data_plate)
        self._fast_elbo = None
        self._fast_for(estimator)
        self._epoch_loss, self._epoch_size, self._last_batch_size = None, 0, 1  # the epoch's training loss
        self._logged_metrics: set = set()  # the held-out metrics given to Lightning this epoch
        self.pyro_params = nn.ParameterDict()
        self._param_state: dict = {"params": {}, "constraints": {}}
        self._initialized = False
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
        (:func:`pyro_lvm.training.checkpoints.model_from_checkpoint`); a user's own pair is passed as ``model``
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
            model_trace, _ = replayed_traces(self.objective.model, self.objective.guide, *args, **kwargs)
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
        (:class:`pyro_lvm.training.fast_step.FastLoss`; see ``fast_step``).
        """
        args, kwargs, batch_size = self._inputs(batch)
        self._last_batch_size = batch_size
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
        self._last_loss = detached = loss.detach()
        # the epoch's mean, weighted by batch size, kept here: Lightning's own (self.log with on_epoch=True)
        # costs about a millisecond per call on the host, as much as a small model's whole step
        size = self._last_batch_size
        self._epoch_loss = detached * size if self._epoch_loss is None else self._epoch_loss + detached * size
        self._epoch_size += size
        if self._ends_epoch(batch_idx):  # logged here, not at epoch end, so that callbacks' epoch-end hooks see it
            self._log_epoch_loss()
        if self._writes_step_metrics():
            self.log("train/loss_step", detached, prog_bar=True, on_step=True, on_epoch=False)
            self.log("train/beta", beta, on_step=True, on_epoch=False)
            if self.kl_control is not None:
                for key, value in self.kl_control.state().items():  # e.g. the capacity C(t)
                    self.log(f"train/{key}", value, on_step=True, on_epoch=False)
        return loss

    def _writes_step_metrics(self) -> bool:
        """Whether Lightning writes this step's metrics (every ``log_every_n_steps``): only then are they logged."""
        trainer = self._trainer
        try:
            return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)
        except AttributeError:  # no trainer, or a Lightning without this hook: log every step
            return True

    def _ends_epoch(self, batch_idx: int) -> bool:
        """Whether this is the epoch's last training step (its last batch, a batch limit, or ``max_steps``)."""
        trainer = self._trainer
        if trainer is None:
            return False
        limit = trainer.num_training_batches
        last = bool(getattr(trainer, "is_last_batch", False)) or (isinstance(limit, int) and batch_idx + 1 >= limit)
        return last or (trainer.max_steps is not None and 0 < trainer.max_steps <= self.global_step + 1)

    def _log_epoch_loss(self) -> None:
        if self._epoch_loss is not None and self._epoch_size:
            self.log("train/loss_epoch", self._epoch_loss / self._epoch_size, on_step=False, on_epoch=True,
                     batch_size=1)
        self._epoch_loss, self._epoch_size = None, 0

    def on_train_epoch_end(self) -> None:
        self._log_epoch_loss()  # an epoch that ended before the step _ends_epoch recognizes (a stop, a time limit)

    def _evaluate(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        """One held-out batch: the ELBO's terms, added to the epoch's :class:`HeldOutMean` s."""
        args, kwargs, batch_size = self._inputs(batch)
        fast = self._fast if self._fast is not None and self._fast.closed_form else None
        monitor = None if self.trainer.sanity_checking else self.latent_monitor
        with self._scope():
            if fast is not None and len(args) == 1 and not self._model_keys.intersection(kwargs):
                local, shared = self.held_out_terms.closed_form(fast, args[0], monitor)
            else:
                local, shared = self.held_out_terms.traced(self.objective.model, self.objective.guide, args, kwargs,
                                                           monitor)
        lvm = getattr(self, "lvm", None)
        extra, on_batch = getattr(lvm, "evaluation_metrics", None), getattr(lvm, "held_out_metrics", None)
        if callable(extra):  # e.g. a flow's bits per dimension (linear in the terms)
            local.update(extra(local))
            shared.update(extra(shared))
        for key, value in (accepting(on_batch)(*args, **kwargs) if callable(on_batch) else {}).items():
            local[key], shared[key] = value, torch.zeros_like(value)  # e.g. a classifier's errors in the batch
        for key, value in local.items():
            name = f"{stage}/{key}"
            key_ = name.replace("/", "_")
            if key_ not in self.held_out:
                self.held_out[key_] = HeldOutMean().to(value.device)
            metric = self.held_out[key_]
            metric.update(value.detach(), shared[key].detach(), batch_size)
            if name not in self._logged_metrics:  # once per epoch: Lightning computes and resets it at the end
                self._logged_metrics.add(name)
                self.log(name, metric, prog_bar=stage == "val" and key == "elbo", on_step=False, on_epoch=True,
                         batch_size=batch_size, metric_attribute=f"held_out.{key_}")
        return {key: value for key, value in local.items() if key in ("elbo", "reconstruction", "kl")}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._evaluate(batch, "test")

    # ----- the latent code, each epoch ---------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._logged_metrics = set()
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
        :class:`pyro_lvm.cli.fit.LVMCLI`) build their optimizer on these groups.

        Example:
            >>> from pyro_lvm import VAE
            >>> from pyro_lvm.estimators import ScoreFunctionELBO
            >>> module = LVMModule(VAE(data_shape=4, latent_dim=2, hidden_dims=[8]),
            ...                    estimator=ScoreFunctionELBO(baseline="nvil"))
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
        loss = getattr(self, "_last_loss", None)
        if all_finite(optimizer, loss):
            return
        if self.nonfinite == "skip":
            drop_gradients(optimizer)
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            return
        trainer = self._trainer
        last = getattr(getattr(trainer, "checkpoint_callback", None), "last_model_path", "") if trainer else ""
        raise DivergedError(divergence_message(self.global_step, self.current_epoch, optimizer, loss, last))

    def on_train_epoch_start(self) -> None:
        self._epoch_loss, self._epoch_size = None, 0
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
        lvm = getattr(self, "lvm", None)
        mismatch = state_mismatch(checkpoint["state_dict"], self.state_dict(), info.get("model", {}).get("config"),
                                  getattr(lvm, "config", None))
        if mismatch:
            raise ValueError(mismatch)
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
                out += config_differences(stored.get("config"), lvm.config, "model.")
        if info.get("run_config") is not None and self.run_config is not None:
            out += [d for d in config_differences(info["run_config"], self.run_config, "") if d not in out]
        return out
