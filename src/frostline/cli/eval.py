"""`frostline eval RUN`: how a run's best weights classify its validation split or a file.

Prints accuracy with its standard error, per-class precision, recall and F1, macro-F1, the confusion matrix, the
most confused pairs and a few misclassified examples; writes all of it to a JSON file and the matrix to a PNG.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from frostline.batches import TensorBatches
from frostline.checkpoint import atomic_write_text
from frostline.cli.console import make_console
from frostline.cli.run_args import add_run_arguments, can_write, open_run
from frostline.errors import ConfigError
from frostline.metrics import Classification, classify
from frostline.report.plots import plot_confusion
from frostline.runs import LabelledSet
from frostline.train.evidence import binomial_se
from frostline.train.loop import EvalResult, evaluate, model_forward
from frostline.train.runtime import select_runtime

MATRIX_CLASSES = 12
"""Largest number of classes whose confusion matrix is printed as a table (the PNG and JSON always have it)."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a run's best weights", description="Evaluate the best weights of a run."
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--data",
        help="a .csv / .jsonl file, an image folder or a built-in set to evaluate on (default: the run's own validation split)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    parser.add_argument(
        "--examples", type=int, default=5, help="misclassified examples to show (default 5; all are in the JSON)"
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="where to write eval[-DATA].json and its confusion PNG (default: the run folder)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.examples < 0:
        raise ConfigError(f"--examples must be >= 0, got {args.examples}")
    output = Path(args.output) if args.output else Path(args.run_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; name a folder")
    write, folder = can_write(output)
    if not write and args.output:
        raise ConfigError(f"--output {output}: cannot write into {folder} (no permission); name another folder")
    console = make_console()
    trained = open_run(args, console)
    # evaluation runs wherever this machine can (the run may have trained on a GPU this one lacks)
    runtime = select_runtime("auto", trained.config.run.precision)
    examples = trained.labelled(args.data) if args.data else trained.validation()
    model = trained.model.to(runtime.device)
    batches = TensorBatches(examples.inputs, examples.labels, args.batch_size, transform=examples.transform)
    with Progress(
        TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    ) as progress:
        result = evaluate(model_forward(model), progress.track(batches, total=len(batches)), runtime, [model])
    scores = classify(trained.labels, examples.labels, result.predictions)

    console.print(f"{args.run_dir} on {examples.where}: {len(examples.labels):,d} examples", highlight=False)
    n = len(result.correct)
    se = 100 * binomial_se(result.accuracy, n)
    console.print(
        f"accuracy [bold]{100 * result.accuracy:.2f}%[/] ± {se:.2f} (one standard error, {n:,d} examples)  "
        f"macro-F1 [bold]{100 * scores.macro_f1:.2f}%[/]  loss {result.loss:.4f}",
        highlight=False,
    )
    console.print(_class_table(scores))
    if len(scores.labels) <= MATRIX_CLASSES:
        console.print(_matrix_table(scores))
    else:
        console.print(f"[dim]confusion matrix: {len(scores.labels)} classes, in the PNG and the JSON[/]")
    pairs = scores.confused_pairs(top=5)
    if pairs:
        console.print(
            "most confused: " + "; ".join(f"{p.truth} -> {p.predicted} {p.count} (of {p.of:,d})" for p in pairs),
            highlight=False,
        )
    wrong = _misclassified(result, examples, trained.labels)
    if wrong and args.examples:
        console.print(f"misclassified ({min(args.examples, len(wrong))} of {len(wrong)}, most confident first):")
        for item in wrong[: args.examples]:
            shown = " ".join(item["example"].split())
            shown = shown if len(shown) <= 90 else shown[:87] + "..."
            console.print(
                f"  [bold]{item['true']}[/] -> [red]{item['predicted']}[/] {100 * item['probability']:.1f}%  "
                f"[dim]{shown}[/]",
                highlight=False,
            )
    stem = "eval" if not args.data else f"eval-{_slug(args.data)}"
    record = {
        "run": str(args.run_dir),
        "data": examples.where,
        "loss": result.loss,
        "accuracy_se": se / 100,
        **scores.to_dict(),
        "misclassified": wrong,
    }
    if not write:
        # a shared, read-only run folder is still evaluated; only the files are left out, and the way to keep them said
        console.print(
            f"[yellow]{stem}.json and its confusion PNG not written: {output} is read-only here; pass --output DIR "
            "to keep them[/]",
            highlight=False,
        )
        return 0
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / f"{stem}.json", json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    plot_confusion(scores, output / f"{stem}-confusion.png", title=f"{Path(args.run_dir).name} on {examples.where}")
    console.print(f"wrote {output / f'{stem}.json'} and {output / f'{stem}-confusion.png'}", highlight=False)
    return 0


def _class_table(scores: Classification) -> Table:
    table = Table(header_style="bold", box=None, pad_edge=False)
    for name in ("class", "examples", "precision", "recall", "F1"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for c in scores.classes:
        table.add_row(
            c.name, f"{c.support:,d}", f"{100 * c.precision:.1f}%", f"{100 * c.recall:.1f}%", f"{100 * c.f1:.1f}%"
        )
    return table


def _matrix_table(scores: Classification) -> Table:
    table = Table(
        title="confusion matrix (rows: true class, columns: predicted)",
        title_justify="left",
        header_style="bold",
        box=None,
        pad_edge=False,
    )
    table.add_column("true \\ predicted")
    for name in scores.labels:
        table.add_column(name, justify="right")
    for t, row in enumerate(scores.confusion):
        cells = [
            f"[bold]{count:,d}[/]" if t == p else (f"[red]{count:,d}[/]" if count else "[dim]0[/]")
            for p, count in enumerate(row)
        ]
        table.add_row(scores.labels[t], *cells)
    return table


def _misclassified(result: EvalResult, examples: LabelledSet, labels: list[str]) -> list[dict]:
    """Every wrongly predicted example, most confident mistake first."""
    wrong = (~result.correct).nonzero().flatten().tolist()
    items = [
        {
            "index": i,
            "true": labels[int(examples.labels[i])],
            "predicted": labels[int(result.predictions[i])],
            "probability": float(result.probabilities[i, result.predictions[i]]),
            "example": examples.describe(i),
        }
        for i in wrong
    ]
    return sorted(items, key=lambda item: -item["probability"])


def _slug(ref: str) -> str:
    """A data reference as a file-name part: `data/held out.csv` -> `held-out`."""
    name = Path(ref.rstrip("/")).stem or ref
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "data"
