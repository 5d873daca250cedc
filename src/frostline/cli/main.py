"""`frostline`: the entry point; each subcommand lives in its own module beside this one."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.text import Text

from frostline import __version__
from frostline.cli import eval as eval_cmd
from frostline.cli import export as export_cmd
from frostline.cli import fit as fit_cmd
from frostline.cli import inspect as inspect_cmd
from frostline.cli import lr_find as lr_find_cmd
from frostline.cli import predict as predict_cmd
from frostline.errors import FrostlineError

SUBCOMMANDS = [fit_cmd, eval_cmd, predict_cmd, export_cmd, inspect_cmd, lr_find_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frostline",
        description="Fine-tune pretrained PyTorch models the way practitioners know works, and prove each step.",
    )
    parser.add_argument("--version", action="version", version=f"frostline {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.debug:
        return args.run(args)
    try:
        return args.run(args)
    except FrostlineError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130
    except MemoryError:
        return _fail("out of memory; use a smaller data.batch_size, data.max_length or data.image_size, or data.limit")
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        return _fail(f"{err.strerror or err}{where}")
    except Exception as err:  # the last line of defence: one line, never a traceback, unless asked for
        return _fail(
            f"unexpected {type(err).__name__}: {err}. frostline does not check this input yet; "
            f"run `frostline --debug {args.command} ...` for the traceback and report it"
        )


def _fail(message: str) -> int:
    """Print one error message on stderr; the exit code is 1."""
    Console(stderr=True, soft_wrap=True).print(Text("error: ", style="bold red") + Text(message))
    return 1


if __name__ == "__main__":
    sys.exit(main())
