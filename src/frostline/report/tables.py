"""Tables for people: the model map, what a freeze trains, and the summary of a run."""

from __future__ import annotations

from rich.table import Table

from frostline.freeze import FreezePlan
from frostline.inspect import ModelMap
from frostline.recipe import EpochRecord
from frostline.train.trainer import FitResult


def _count(trainable: int, total: int) -> str:
    if trainable == 0:
        return "[dim]0[/]"
    return f"[green]{trainable:,d}[/]" if trainable == total else f"[yellow]{trainable:,d}[/]"


def model_map_table(model_map: ModelMap, plan: FreezePlan | None = None, title: str | None = None) -> Table:
    """The map as a table in forward order, head marked; with a plan, trainable parameters before and after."""
    after = {e.path: e for e in plan.entries} if plan is not None else {}
    table = Table(title=title, title_justify="left", show_footer=True, pad_edge=False, box=None, header_style="bold")
    table.add_column("#", justify="right", footer="")
    table.add_column("entry", footer="total", no_wrap=True)
    table.add_column("type", no_wrap=True, style="dim", max_width=24)
    table.add_column("kind", no_wrap=True)
    table.add_column("tensors", justify="right", footer=f"{model_map.tensors:,d}")
    table.add_column("params", justify="right", footer=f"{model_map.params:,d}")
    if plan is not None:
        table.add_column("trainable before", justify="right", footer=f"{plan.trainable_params_before:,d}")
        table.add_column("after", justify="right", footer=f"{plan.trainable_params:,d}")
    else:
        table.add_column("trainable", justify="right", footer=f"{model_map.trainable_params:,d}")
    for i, entry in enumerate(model_map.entries):
        path = entry.path or "(model)"
        if not entry.called:
            path += " (never ran)"
        kind = "[bold magenta]HEAD[/]" if entry.kind == "head" else entry.kind
        row = [str(i), path, entry.module_type, kind, f"{entry.tensors:,d}", f"{entry.params:,d}"]
        if plan is not None:
            change = after[entry.path]
            row += [
                _count(change.trainable_params_before, change.params),
                _count(change.trainable_params_after, change.params),
            ]
        else:
            row.append(_count(entry.trainable_params, entry.params))
        table.add_row(*row)
    return table


def summary_table(result: FitResult) -> Table:
    """One row per stage: what trained, for how long, how well; the caption says which weights were kept and why training stopped."""
    table = Table(title="run summary", title_justify="left", header_style="bold", box=None, pad_edge=False)
    for name, justify in [
        ("stage", "left"),
        ("freeze", "left"),
        ("trainable", "right"),
        ("epochs", "right"),
        ("train loss", "right"),
        ("val loss", "right"),
        ("val acc", "right"),
        ("best", "right"),
        ("time", "right"),
    ]:
        table.add_column(name, justify=justify, no_wrap=True)
    stages: dict[str, list[EpochRecord]] = {}
    for record in result.history:
        stages.setdefault(record.stage, []).append(record)
    for name, records in stages.items():
        last = records[-1]
        top = max(records, key=lambda r: r.val_accuracy)
        seconds = sum(r.train_seconds + r.eval_seconds + r.cache_seconds for r in records)
        spec = result.stage_plans.get(name, {}).get("spec", last.freeze)
        kept = "[bold green]kept[/]" if result.best_stage == name else ""
        table.add_row(
            name,
            spec,
            f"{last.trainable_params:,d}",
            str(len(records)),
            f"{last.train_loss:.4f}",
            f"{last.val_loss:.4f}",
            f"{100 * top.val_accuracy:.2f}%",
            kept,
            f"{seconds:.1f}s",
        )
    return table
