"""What frostline shows people: tables of the model map and of what a freeze trains."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from frostline.freeze import FreezePlan
from frostline.inspect import ModelMap
from frostline.lr_finder import LRFinderResult


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


def plot_lr_find(result: LRFinderResult, path: str | Path, title: str = "learning-rate range test") -> Path:
    """Loss against learning rate (log scale), raw and smoothed, with both heuristics and the choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss per step")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
    marks = [("steepest", result.steepest, "tab:orange"), ("valley", result.valley, "tab:green")]
    for name, lr, color in marks:
        if lr is None:
            continue
        chosen = name == result.method
        y = result.smoothed[result.lrs.index(lr)]
        ax.axvline(lr, color=color, linestyle="-" if chosen else ":", linewidth=2 if chosen else 1)
        ax.plot([lr], [y], "o", color=color, markersize=9 if chosen else 6)
        label = f"{name}: {lr:.2g}" + ("  <- suggested" if chosen else "")
        ax.annotate(
            label,
            (lr, y),
            xytext=(8, 12 if chosen else -18),
            textcoords="offset points",
            color=color,
            fontweight="bold" if chosen else "normal",
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (base rate; every group scaled with it)")
    ax.set_ylabel("training loss")
    low, high = min(result.smoothed), max(result.smoothed[: max(1, len(result.smoothed) // 3)])
    ax.set_ylim(low - 0.1 * (high - low), high + 0.35 * (high - low))
    ax.set_title(f"{title}\nsuggested {result.suggestion:.2g} ({result.method}); {result.stopped}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
