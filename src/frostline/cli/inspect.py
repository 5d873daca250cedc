"""`frostline inspect MODEL_REF`: the model map, the head, and what a freeze spec would train."""

from __future__ import annotations

import argparse
import json

from frostline.adapters import adapt_and_map
from frostline.cli.console import make_console
from frostline.freeze import FreezeSpec, freeze
from frostline.inspect import inspect_model
from frostline.report import model_map_table
from frostline.sources import open_model
from frostline.sources.models import FORMS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a model's blocks in forward order, its head, and what a freeze spec trains",
        description="Show a model's blocks in forward order, its head, and what a freeze spec would train.",
    )
    parser.add_argument("model", metavar="MODEL_REF", help=f"one of: {', '.join(FORMS)}")
    parser.add_argument(
        "--freeze",
        metavar="SPEC",
        help="a freeze spec: head, last:N, from:PATH, none, bitfit, train=GLOB,..., freeze=GLOB,..., lora[:r=8,alpha=16,dropout=0.05,targets=GLOB,...]; add ;bn=train to let frozen BatchNorm update",
    )
    parser.add_argument("--num-classes", type=int, metavar="N", help="size the head for N classes")
    parser.add_argument("--json", action="store_true", help="print the map (and plan) as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    console = make_console()
    source = open_model(args.model, args.num_classes)
    adapters = None
    if args.freeze and FreezeSpec.parse(args.freeze).mode == "lora":
        model_map, adapters = adapt_and_map(source.model, source.example_batch, spec=args.freeze)
        source.notes.append(adapters.describe())
    else:
        model_map = inspect_model(source.model, source.example_batch)
    plan = freeze(source.model, args.freeze, model_map) if args.freeze else None
    if args.json:
        payload = {
            "model": source.ref,
            "pretrained": source.pretrained,
            "notes": source.notes,
            "map": model_map.to_dict(),
        }
        if plan is not None:
            payload["freeze"] = plan.to_dict()
        print(json.dumps(payload, indent=2))
        return 0
    for note in source.notes:
        console.print(f"[dim]{note}[/]" if source.pretrained else f"[yellow]{note}[/]", highlight=False)
    title = f"{source.ref}: {len(model_map.blocks)} blocks, head [bold]{model_map.head}[/] (found by {model_map.head_found_by})"
    console.print(model_map_table(model_map, plan, title=title))
    if plan is not None:
        console.print(plan.summary(), highlight=False)
        if plan.held_in_eval:
            console.print(
                f"{len(plan.held_in_eval):,d} frozen modules held in eval mode through model.train(): dropout off"
                + (
                    ", BatchNorm statistics fixed (bn=eval)"
                    if plan.spec.bn == "eval"
                    else ", BatchNorm updating (bn=train)"
                ),
                highlight=False,
            )
    return 0
