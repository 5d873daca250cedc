"""Plots for people: the learning-rate range test, the training report of a run, and a confusion matrix."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from frostline.lr_finder import LRFinderResult
from frostline.metrics import Classification
from frostline.recipe import EpochRecord
from frostline.train.evidence import binomial_se


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def plot_lr_find(result: LRFinderResult, path: str | Path, title: str = "learning-rate range test") -> Path:
    """Loss against learning rate (log scale), raw and smoothed, with both heuristics and the choice marked."""
    plt = _pyplot()
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
    _save(fig, path)
    plt.close(fig)
    return path


def _noise_bands(ax_loss, ax_acc, history: list[EpochRecord]) -> None:
    """Shade one standard error around the validation loss and accuracy: what the validation set can resolve."""
    known = [r for r in history if r.val_count]
    if not known:
        return
    n = known[-1].val_count
    xs = [r.epoch for r in known]
    accuracy = [100 * r.val_accuracy for r in known]
    acc_se = [100 * binomial_se(r.val_accuracy, r.val_count) for r in known]
    ax_acc.fill_between(
        xs,
        [a - e for a, e in zip(accuracy, acc_se, strict=True)],
        [a + e for a, e in zip(accuracy, acc_se, strict=True)],
        color="tab:orange",
        alpha=0.2,
        linewidth=0,
        label=f"± 1 standard error ({n:,d} examples)",
    )
    spread = [r for r in known if r.val_loss_sd is not None]
    if spread:
        loss_se = [r.val_loss_sd / math.sqrt(r.val_count) for r in spread]
        ax_loss.fill_between(
            [r.epoch for r in spread],
            [r.val_loss - e for r, e in zip(spread, loss_se, strict=True)],
            [r.val_loss + e for r, e in zip(spread, loss_se, strict=True)],
            color="tab:orange",
            alpha=0.2,
            linewidth=0,
            label=f"± 1 standard error ({n:,d} examples)",
        )


def plot_training(
    history: list[EpochRecord],
    path: str | Path,
    best_epoch: int | None = None,
    overfit_began: int | None = None,
    stop_reason: str = "",
    title: str = "",
) -> Path:
    """Loss, validation accuracy and learning rate per group against epoch, with stage boundaries,
    the epoch whose weights were kept, and where overfitting began, all marked."""
    plt = _pyplot()
    path = Path(path)
    epochs = [r.epoch for r in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(
        3, 1, figsize=(9, 9.5), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 2.2, 1.8]}
    )
    ax_loss.plot(epochs, [r.train_loss for r in history], "o-", color="tab:blue", label="training loss")
    ax_loss.plot(epochs, [r.val_loss for r in history], "s-", color="tab:orange", label="validation loss")
    ax_acc.plot(epochs, [100 * r.val_accuracy for r in history], "s-", color="tab:orange", label="validation accuracy")
    ax_acc.plot(
        epochs,
        [100 * r.train_accuracy if r.train_accuracy is not None else float("nan") for r in history],
        "o--",
        color="tab:blue",
        alpha=0.6,
        label="training accuracy",
    )
    _noise_bands(ax_loss, ax_acc, history)

    groups: dict[str, tuple[list[float], list[float]]] = {}
    for i, record in enumerate(history):
        new_stage = i > 0 and record.stage != history[i - 1].stage
        for name, trace in record.lr_trace.items():
            xs, ys = groups.setdefault(name, ([], []))
            if new_stage and xs:
                # a gap, so that a group's rate is not drawn across a stage boundary
                xs.append(record.epoch - 0.5)
                ys.append(float("nan"))
            for k, lr in enumerate(trace):
                xs.append(record.epoch - 1 + (k + 0.5) / len(trace) + 0.5)
                ys.append(lr)
    for name, (xs, ys) in groups.items():
        if any(y > 0 for y in ys):
            ax_lr.plot(xs, ys, linewidth=1.5, label=name)
    ax_lr.set_yscale("log")

    # stage boundaries and names
    starts = [r for i, r in enumerate(history) if i == 0 or r.stage != history[i - 1].stage]
    for record in starts:
        x = record.epoch - 0.5
        for ax in (ax_loss, ax_acc, ax_lr):
            if record is not history[0]:
                ax.axvline(x, color="0.4", linestyle="--", linewidth=1)
        ax_loss.annotate(
            f"stage {record.stage}\n{record.trainable_params:,d} trainable",
            (x, 1),
            xycoords=("data", "axes fraction"),
            xytext=(4, -4),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="0.3",
        )
    if overfit_began is not None:
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.axvspan(overfit_began - 0.5, epochs[-1] + 0.5, color="tab:red", alpha=0.10)
        ax_loss.annotate(
            f"overfitting from epoch {overfit_began}",
            (overfit_began - 0.4, 0.55),
            xycoords=("data", "axes fraction"),
            color="tab:red",
            fontweight="bold",
            fontsize=9,
        )
    if best_epoch:
        best = history[best_epoch - 1]
        for ax in (ax_loss, ax_acc, ax_lr):
            ax.axvline(best_epoch, color="tab:green", linewidth=2, alpha=0.7)
        ax_acc.plot(
            [best_epoch],
            [100 * best.val_accuracy],
            "*",
            color="tab:green",
            markersize=18,
            zorder=5,
            label=f"kept: epoch {best_epoch}, {100 * best.val_accuracy:.2f}%",
        )
        ax_acc.annotate(
            f"best weights kept\nepoch {best_epoch} ({best.stage})\n{100 * best.val_accuracy:.2f}%",
            (best_epoch, 100 * best.val_accuracy),
            xytext=(10, -40),
            textcoords="offset points",
            color="tab:green",
            fontweight="bold",
            fontsize=9,
        )

    ax_loss.set_ylabel("cross-entropy loss")
    ax_acc.set_ylabel("accuracy (%)")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_xticks(epochs)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best" if ax is ax_loss else "upper right" if ax is ax_lr else "lower right", fontsize=8)
    fig.suptitle(f"{title}\n{stop_reason}" if title else stop_reason, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_confusion(result: Classification, path: str | Path, title: str = "") -> Path:
    """The confusion matrix: each cell coloured by the share of its true class (row) and labelled with its count,
    so a small class's mistakes show as clearly as a large one's; precision and recall per class on the margins."""
    plt = _pyplot()
    path = Path(path)
    n = len(result.labels)
    counts = result.confusion
    shares = [[c / sum(row) if sum(row) else 0.0 for c in row] for row in counts]
    side = min(max(4.5, 0.55 * n + 2.5), 24)
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=120)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    if n <= 30:
        for t in range(n):
            for p in range(n):
                if counts[t][p]:
                    dark = shares[t][p] > 0.55
                    ax.text(
                        p,
                        t,
                        f"{counts[t][p]:,d}",
                        ha="center",
                        va="center",
                        fontsize=8 if n > 12 else 10,
                        color="white" if dark else ("tab:red" if t != p else "black"),
                    )
    classes = result.classes
    ax.set_xticks(
        range(n),
        [f"{c.name}\nP {100 * c.precision:.0f}%" for c in classes],
        rotation=45 if n > 6 else 0,
        ha="right" if n > 6 else "center",
        fontsize=8,
    )
    ax.set_yticks(range(n), [f"{c.name}\nR {100 * c.recall:.0f}%, n={c.support:,d}" for c in classes], fontsize=8)
    ax.set_xlabel("predicted class (P: precision)")
    ax.set_ylabel("true class (R: recall)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    heading = (
        f"accuracy {100 * result.accuracy:.2f}%, macro-F1 {100 * result.macro_f1:.2f}%, {result.examples:,d} examples"
    )
    ax.set_title("\n".join([*textwrap.wrap(title, 70), heading]) if title else heading, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
