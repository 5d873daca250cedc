"""`frostline predict RUN`: labels with probabilities from a run's best weights.

Texts or image files as arguments, or a whole file (`--input texts.csv|texts.jsonl`) or image folder
(`--input FOLDER`) streamed in batches, printed or written to a CSV (`--output`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from frostline.batches import batch_to, logits_of
from frostline.cli.console import make_console
from frostline.cli.run_args import add_run_arguments, can_write, open_run
from frostline.errors import ConfigError
from frostline.runs import TrainedRun
from frostline.sources.data import read_texts
from frostline.sources.images import IMAGE_SUFFIXES
from frostline.train.runtime import select_runtime


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="label texts or images with a run's best weights",
        description="Label texts (text runs) or images (image runs) with a run's best weights: given as arguments, "
        "or a .csv / .jsonl file of texts or a folder of images with --input.",
    )
    add_run_arguments(parser)
    parser.add_argument("texts", metavar="TEXT_OR_IMAGE", nargs="*", help="texts, or image files for an image run")
    parser.add_argument(
        "--input", metavar="FILE_OR_FOLDER", help="a .csv / .jsonl file of texts (text runs) or a folder of images"
    )
    parser.add_argument(
        "--text-column", help="the column of --input that holds the texts (default: the run's data.text_column)"
    )
    parser.add_argument(
        "--output", metavar="CSV", help="write every prediction with all class probabilities to this CSV file"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default 64)")
    parser.add_argument("--top", type=int, default=3, help="how many labels to show per example (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    trained = open_run(args, make_console(stderr=True))
    items = _items(args, trained)
    runtime = select_runtime("auto", trained.config.run.precision)
    model = trained.model.to(runtime.device)
    predictions = _predict(trained, model, runtime, items, args.batch_size)
    if args.output:
        return _write_csv(Path(args.output), trained, items, predictions)
    console = make_console()
    for source, probs in predictions:
        ranked = sorted(zip(trained.labels, probs.tolist(), strict=True), key=lambda pair: -pair[1])[: args.top]
        if args.json:
            print(json.dumps({"text": source, "label": ranked[0][0], "probabilities": dict(ranked)}), flush=True)
            continue
        shown = " ".join(source.split())
        shown = shown if len(shown) <= 70 else shown[:67] + "..."
        others = "  ".join(f"{name} {100 * p:.1f}%" for name, p in ranked[1:])
        console.print(f"[bold]{ranked[0][0]}[/] {100 * ranked[0][1]:.1f}%  [dim]{others}[/]  {shown}", highlight=False)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if bool(args.texts) == bool(args.input):
        raise ConfigError(
            "give the texts or image files to label as arguments, or a file or folder with --input (one of the two)"
        )
    if args.output:
        output = Path(args.output)
        if output.is_dir():
            raise ConfigError(f"--output {output} is a folder; name a .csv file")
        if output.exists() and not args.overwrite:
            raise ConfigError(f"--output {output} exists; pass --overwrite to replace it, or name another file")
        write, folder = can_write(output)
        if not write:
            raise ConfigError(f"--output {output}: cannot write into {folder} (no permission); name another file")


def _items(args: argparse.Namespace, trained: TrainedRun) -> list[str]:
    """What to label (texts, or image files), checked against what the run reads.

    Raises:
        ConfigError: images given to a text run or texts to an image run, a missing file, or an empty folder.
    """
    if trained.reads_images:
        if args.texts:
            missing = [t for t in args.texts if not Path(t).is_file()]
            if missing:
                raise ConfigError(f"this run classifies images; {missing[0]!r} is not an image file")
            return list(args.texts)
        folder = Path(args.input)
        if not folder.is_dir():
            raise ConfigError(f"this run classifies images; --input {folder} must be a folder of images")
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise ConfigError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return [str(f) for f in files]
    if args.texts:
        images = [t for t in args.texts if Path(t).suffix.lower() in IMAGE_SUFFIXES and Path(t).is_file()]
        if images:
            raise ConfigError(f"this run classifies texts; {images[0]} is an image file")
        return list(args.texts)
    path = Path(args.input)
    if path.is_dir():
        raise ConfigError(f"this run classifies texts; --input {path} must be a .csv or .jsonl file, not a folder")
    column = args.text_column or trained.config.data.text_column
    return read_texts(path, column, trained.config.data.encoding)


def _predict(trained: TrainedRun, model: torch.nn.Module, runtime, items: list[str], batch_size: int) -> Iterator:
    """(item, class probabilities) for every item, in batches, with a progress bar on stderr for more than one."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    progress = Progress(
        TextColumn("labelling"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=make_console(stderr=True),
        transient=True,
        disable=len(chunks) < 2,
    )
    with progress, torch.inference_mode():
        for chunk in progress.track(chunks):
            with runtime.autocast():
                if trained.reads_images:
                    logits = model(trained.encode_images(chunk).to(runtime.device))
                else:
                    logits = model(**batch_to(trained.encode(chunk), runtime.device))
            probabilities = logits_of(logits).float().softmax(dim=-1).cpu()
            yield from zip(chunk, probabilities, strict=True)


def _write_csv(path: Path, trained: TrainedRun, items: list[str], predictions: Iterator) -> int:
    """Rows as they are predicted into a temporary file next to `path`, renamed over it only when all are in."""
    column = "image" if trained.reads_images else "text"
    header = [column, "label", "probability", *(f"p_{name}" for name in trained.labels)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            counts = dict.fromkeys(trained.labels, 0)
            for source, probs in predictions:
                best = int(probs.argmax())
                counts[trained.labels[best]] += 1
                writer.writerow(
                    [source, trained.labels[best], f"{float(probs[best]):.6f}", *(f"{p:.6f}" for p in probs.tolist())]
                )
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    shares = ", ".join(f"{name} {n:,d}" for name, n in counts.items())
    make_console().print(f"wrote {len(items):,d} predictions to {path} ({shares})", highlight=False)
    return 0
