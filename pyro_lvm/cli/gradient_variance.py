"""``pyro-lvm gradient-variance``: the variance and SNR of several estimators' gradients on a run's model and data."""

from __future__ import annotations

import argparse
import itertools
import warnings

from ..diagnostics.gradients import format_table, gradient_variance
from ..training.checkpoints import load_checkpoint
from .fit import DEFAULT_CONFIG, LVMCLI, quiet

__all__ = ["gradient_variance_main"]

# Keys of a fit configuration that gradient-variance passes on: the pair, its data, the seed.
_CONFIG_OVERRIDES = ("--model.", "--model=", "--data.", "--data=", "--seed_everything")


def _gradient_variance_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-lvm gradient-variance",
        allow_abbrev=False,
        description=(
            "Print the Monte-Carlo variance and signal-to-noise ratio of ELBO-gradient "
            "estimators, per parameter group, for the model and data of a `pyro-lvm fit` "
            "configuration (default: the packaged digits VAE). All estimators are measured "
            "at the same parameters (the initial ones, or --ckpt_path) with the same seeds. "
            "Options --model.KEY=VALUE, --data.KEY=VALUE and --seed_everything=N override "
            "the configuration as in `pyro-lvm fit`."
        ),
    )
    parser.add_argument(
        "-c", "--config", action="append", default=[], metavar="FILE.yaml",
        help="a fit configuration; repeat to layer several, later ones win",
    )
    parser.add_argument(
        "--estimators", default="reparam,analytic_kl,score_function", metavar="NAMES",
        help="comma-separated names for pyro_lvm.make_elbo (with default options); "
        "'config' is the configuration's own estimator (default: %(default)s)",
    )
    parser.add_argument("--num_draws", type=int, default=100, help="gradient draws per estimator (default: %(default)s)")
    parser.add_argument(
        "--batches", type=int, default=1,
        help="training batches to measure on; the table is their mean (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first draw (default: %(default)s)")
    parser.add_argument("--ckpt_path", default=None, help="measure at the parameters of this checkpoint of a run")
    parser.add_argument("--output", default=None, metavar="FILE.csv", help="also write the table as CSV")
    return parser


def _config_overrides(parser: argparse.ArgumentParser, extra: list[str]) -> list[str]:
    """The ``--model.*``/``--data.*`` options among ``extra`` (values joined); others are errors."""
    overrides, unknown = [], []
    tokens = iter(extra)
    for token in tokens:
        if not token.startswith(_CONFIG_OVERRIDES):
            unknown.append(token)
        elif "=" in token:
            overrides.append(token)
        else:
            value = next(tokens, None)
            if value is None:
                parser.error(f"option {token} needs a value ({token}=VALUE)")
            overrides.append(f"{token}={value}")
    if unknown:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)}. Valid options: "
            f"{', '.join(a.option_strings[-1] for a in parser._actions if a.option_strings)}, "
            "and --model.*, --data.*, --seed_everything to override the configuration."
        )
    return overrides


def gradient_variance_main(args: list[str]) -> None:
    """``pyro-lvm gradient-variance``: the table of :func:`pyro_lvm.diagnostics.gradient_variance`
    for the model and data of a fit configuration.

    .. code-block:: console

       $ pyro-lvm gradient-variance --num_draws 200
       $ pyro-lvm gradient-variance --config my_run.yaml --estimators reparam,config \\
             --ckpt_path runs/my_run/version_0/checkpoints/last.ckpt --output table.csv
    """
    import pandas as pd

    from ..estimators import make_elbo

    parser = _gradient_variance_parser()
    options, extra = parser.parse_known_args(args)
    overrides = _config_overrides(parser, extra)
    if options.num_draws < 2:
        parser.error(f"--num_draws must be at least 2; got {options.num_draws}")
    if options.batches < 1:
        parser.error(f"--batches must be at least 1; got {options.batches}")
    names = [name.strip() for name in options.estimators.split(",") if name.strip()]
    if not names:
        parser.error("--estimators is empty; give names such as reparam,score_function")

    estimators = {}
    for name in names:
        try:
            estimators[name] = None if name == "config" else make_elbo(name)
        except ValueError as err:
            parser.error(f"--estimators: {err}")

    with warnings.catch_warnings(), quiet("pytorch_lightning", "lightning_fabric"):
        # the Trainer is built but not used: its notices (accelerators, seed) would only confuse
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = LVMCLI(
            args=[f"--config={path}" for path in options.config] + overrides,
            run=False,
            parser_kwargs={"default_config_files": [str(DEFAULT_CONFIG)]},
        )
    module, datamodule = cli.model, cli.datamodule
    if "config" in estimators:
        estimators["config"] = module.estimator
    datamodule.setup("fit")
    batches = list(itertools.islice(datamodule.train_dataloader(), options.batches))
    if len(batches) < options.batches:
        parser.error(f"--batches {options.batches}: the training data have only {len(batches)} batches")
    module.initialize(batches[0])
    if options.ckpt_path is not None:
        checkpoint = load_checkpoint(options.ckpt_path)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])

    tables = [
        gradient_variance(module, None, estimators, batch, num_draws=options.num_draws, seed=options.seed)
        for batch in batches
    ]
    # the Monte-Carlo noise given a batch, averaged over batches (not the mini-batch noise)
    table = pd.concat(tables).groupby(["estimator", "group"], sort=False, as_index=False).mean()
    table["num_params"] = table["num_params"].astype(int)
    x = batches[0]["x"] if isinstance(batches[0], dict) else batches[0]
    x = x[0] if isinstance(x, (tuple, list)) else x
    print(
        f"Gradients of -ELBO per data point: {options.num_draws} draws (seed {options.seed}) on "
        f"{len(batches)} training batch{'es' if len(batches) > 1 else ''} of {x.shape[0]} "
        f"from {type(datamodule).__name__}, at "
        + (f"the parameters of {options.ckpt_path}" if options.ckpt_path else "the initial parameters")
        + "."
    )
    print(format_table(table))
    if options.output is not None:
        table.to_csv(options.output, index=False)
        print(f"Wrote {options.output}")
