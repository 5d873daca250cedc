"""`frostline eval RUN`: accuracy of a run's best weights, per class, on its validation split or a file."""

from __future__ import annotations

import argparse

from rich.table import Table

from frostline.batches import TensorBatches
from frostline.cli.console import make_console
from frostline.errors import ConfigError
from frostline.runs import load_run
from frostline.train.evidence import binomial_se
from frostline.train.loop import evaluate, model_forward
from frostline.train.runtime import select_runtime


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a run's best weights", description="Evaluate the best weights of a run."
    )
    parser.add_argument("run_dir", metavar="RUN", help="a run folder written by frostline fit")
    parser.add_argument(
        "--data",
        help="a .csv / .jsonl file, an image folder or a built-in set to evaluate on (default: the run's own validation split)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="import the py: references the run's config names (a run folder is data: never without this flag)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    console = make_console()
    trained = load_run(args.run_dir, trust_code=args.trust_code)
    for note in trained.notes:
        console.print(f"[yellow]{note}[/]", highlight=False)
    # evaluation runs wherever this machine can (the run may have trained on a GPU this one lacks)
    runtime = select_runtime("auto", trained.config.run.precision)
    if args.data:
        inputs, labels, transform = trained.labelled(args.data)
        where = args.data
    else:
        inputs, labels, transform, where = trained.validation()
    model = trained.model.to(runtime.device)
    result = evaluate(
        model_forward(model), TensorBatches(inputs, labels, args.batch_size, transform=transform), runtime, [model]
    )
    console.print(f"{args.run_dir} on {where}: {len(labels):,d} examples", highlight=False)
    n = len(result.correct)
    se = 100 * binomial_se(result.accuracy, n)
    console.print(
        f"accuracy [bold]{100 * result.accuracy:.2f}%[/] ± {se:.2f} (one standard error, {n:,d} examples)  "
        f"loss {result.loss:.4f}",
        highlight=False,
    )
    table = Table(header_style="bold", box=None, pad_edge=False)
    for name in ("class", "examples", "precision", "recall"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for k, name in enumerate(trained.labels):
        truth, predicted = labels == k, result.predictions == k
        hits = int((truth & predicted).sum())
        precision = hits / int(predicted.sum()) if predicted.any() else float("nan")
        recall = hits / int(truth.sum()) if truth.any() else float("nan")
        table.add_row(name, f"{int(truth.sum()):,d}", f"{100 * precision:.1f}%", f"{100 * recall:.1f}%")
    console.print(table)
    return 0
