"""What the subcommands that read a finished run (eval, predict, export) share: its arguments and how it is opened."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console

from frostline.runs import TrainedRun, load_run


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN, and --trust-code (a run folder is data: the code its config names is never imported without it)."""
    parser.add_argument("run_dir", metavar="RUN", help="a run folder written by frostline fit")
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="import the py: references the run's config names (a run folder is data: never without this flag)",
    )


def open_run(args: argparse.Namespace, console: Console) -> TrainedRun:
    """The run with its verified best weights; what people should know about how it was read goes to `console`."""
    trained = load_run(args.run_dir, trust_code=args.trust_code)
    for note in trained.notes:
        console.print(f"[yellow]{note}[/]", highlight=False)
    return trained


def can_write(path: Path) -> tuple[bool, Path]:
    """Whether `path` (a file or folder, made if missing) can be written here, and the folder that decides it: the
    path itself when it is a folder, else its nearest existing parent."""
    folder = path if path.is_dir() else next((p for p in path.absolute().parents if p.exists()), Path("/"))
    return os.access(folder, os.W_OK), folder
