"""`frostline export RUN --format torchscript|onnx|hf --output DIR`: the best model as a folder that runs without
frostline, checked by loading it back with its own runtime."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from frostline.cli.console import make_console
from frostline.cli.run_args import add_run_arguments, open_run
from frostline.export import FORMATS, export, prepare_folder


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a run's best model as TorchScript, ONNX or a transformers folder",
        description="Write a run's best model as a folder that runs without frostline (the model, its labels, the "
        "tokenizer or image preprocessing), then load it back with its runtime and check its logits.",
    )
    add_run_arguments(parser)
    parser.add_argument("--format", required=True, choices=FORMATS, help="torchscript, onnx, or hf (transformers)")
    parser.add_argument("--output", metavar="DIR", help="the folder to write (default: RUN/export-FORMAT)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.output) if args.output else Path(args.run_dir) / f"export-{args.format}"
    prepare_folder(folder, args.overwrite)
    console = make_console()
    trained = open_run(args, console)
    made = not folder.exists()
    try:
        with console.status(f"exporting {args.run_dir} as {args.format}"):
            done = export(trained, args.format, folder)
    except BaseException:
        # a failed export leaves nothing behind that could pass for one
        if made:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for path in folder.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise
    for note in done.notes:
        console.print(note, highlight=False, soft_wrap=True)
    console.print(f"wrote {done.folder} ({', '.join(done.files)})", highlight=False, soft_wrap=True)
    console.print(f"checked: {done.checked}", highlight=False, soft_wrap=True)
    return 0
