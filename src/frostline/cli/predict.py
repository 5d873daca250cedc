"""`frostline predict RUN TEXT...` or `RUN IMAGE...`: labels with probabilities from a run's best weights."""

from __future__ import annotations

import argparse
import json

import torch

from frostline.batches import logits_of
from frostline.cli.console import make_console
from frostline.errors import ConfigError
from frostline.runs import load_run


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="label texts or image files with a run's best weights",
        description="Label texts (text runs) or image files (image runs) with a run's best weights.",
    )
    parser.add_argument("run_dir", metavar="RUN", help="a run folder written by frostline fit")
    parser.add_argument("texts", metavar="TEXT_OR_IMAGE", nargs="+", help="texts, or image files for an image run")
    parser.add_argument("--top", type=int, default=3, help="how many labels to show per text (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="import the py: references the run's config names (a run folder is data: never without this flag)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    console = make_console()
    trained = load_run(args.run_dir, trust_code=args.trust_code)
    for note in trained.notes:
        make_console(stderr=True).print(f"[yellow]{note}[/]", highlight=False)
    with torch.inference_mode():
        if trained.reads_images:
            logits = trained.model(trained.encode_images(args.texts))
        else:
            logits = trained.model(**trained.encode(args.texts))
        probabilities = logits_of(logits).float().softmax(dim=-1)
    for text, probs in zip(args.texts, probabilities, strict=True):
        ranked = sorted(zip(trained.labels, probs.tolist(), strict=True), key=lambda pair: -pair[1])[: args.top]
        if args.json:
            print(json.dumps({"text": text, "label": ranked[0][0], "probabilities": dict(ranked)}))
            continue
        shown = text if len(text) <= 70 else text[:67] + "..."
        others = "  ".join(f"{name} {100 * p:.1f}%" for name, p in ranked[1:])
        console.print(f"[bold]{ranked[0][0]}[/] {100 * ranked[0][1]:.1f}%  [dim]{others}[/]  {shown}", highlight=False)
    return 0
