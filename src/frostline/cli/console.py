"""The terminal consoles the subcommands print to."""

from __future__ import annotations

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    """A console that does not squeeze tables into 80 columns when output is piped or captured."""
    console = Console(stderr=stderr, soft_wrap=False)
    if not console.is_terminal:
        console.width = 140
    return console
