"""Score the overfitting monitor on the recorded real training histories in tests/data/histories/.

The ground truth and the score are defined in tests/data/histories/README.md (fixed before the monitor ran on them).
`tests/test_monitor_histories.py` holds the targets; this file also runs as a script, on any source tree:

    python tests/monitor_histories.py                     # this tree
    python tests/monitor_histories.py --src /path/to/src  # another tree (e.g. a worktree of an older commit)
    python tests/monitor_histories.py --table out.md      # the per-run table as Markdown too
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
HISTORIES = HERE / "data" / "histories"
CALL = "overfitting"
"""The verdict that calls a run overfitting (its onset, or overfitting proved)."""
SLACK = 3
"""'Within patience plus a few epochs': the few."""


def load(path: Path) -> dict[str, Any]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def runs(folder: Path = HISTORIES) -> list[dict[str, Any]]:
    return [load(path) for path in sorted(folder.glob("*.json.gz"))]


@dataclass(frozen=True)
class Truth:
    overfits: bool
    began: int | None
    """First epoch of overfitting (1-based), when it overfits."""
    why: str


def ground_truth(run: dict[str, Any]) -> Truth:
    """The README's rule, on the truth split the monitor never sees."""
    h = run["history"]
    m = run["truth_size"]
    losses = [e["truth_loss"] for e in h]
    accs = [e["truth_accuracy"] for e in h]
    e_min = losses.index(min(losses))
    e_acc = accs.index(max(accs))
    last = h[-1]
    began, why = [], []
    rise = last["truth_loss"] - losses[e_min]
    noise = max(0.05 * losses[e_min], 2 * last["truth_loss_sd"] / math.sqrt(m))
    if rise > noise and last["train_loss"] < h[e_min]["train_loss"]:
        began.append(e_min + 2)
        why.append(f"truth loss {losses[e_min]:.4f} (epoch {e_min + 1}) -> {last['truth_loss']:.4f}")
    p = accs[e_acc]
    if p - last["truth_accuracy"] > 2 * math.sqrt(p * (1 - p) / m):
        began.append(e_acc + 2)
        why.append(f"truth accuracy {p:.4f} (epoch {e_acc + 1}) -> {last['truth_accuracy']:.4f}")
    if began:
        return Truth(True, min(began), "; ".join(why))
    return Truth(False, None, f"truth loss low {losses[e_min]:.4f} at epoch {e_min + 1}, last {last['truth_loss']:.4f}")


def records(run: dict[str, Any], with_examples: bool = True) -> list[Any]:
    """The run's epochs as the monitor reads them: EpochRecord-like objects (attributes), per-example results as
    tensors in `examples` unless `with_examples` is False."""
    import torch

    try:
        from frostline.train.evidence import ValidationExamples
    except ImportError:  # a tree from before the monitor knew examples: it reads none of them
        ValidationExamples = SimpleNamespace  # noqa: N806
    out = []
    for e in run["history"]:
        examples = None
        if with_examples:
            examples = ValidationExamples(
                losses=torch.tensor(e["val_losses"], dtype=torch.float32),
                correct=torch.tensor([c == "1" for c in e["val_correct"]]),
            )
        out.append(
            SimpleNamespace(
                epoch=e["epoch"],
                stage="run",
                stage_index=0,
                stage_epoch=e["epoch"],
                freeze="?",
                train_loss=e["train_loss"],
                val_loss=e["val_loss"],
                val_accuracy=e["val_accuracy"],
                val_count=run["val_size"],
                examples=examples,
                verdict=None,
                best=False,
            )
        )
    return out


@dataclass
class Score:
    name: str
    truth: Truth
    stopped: int
    """Epoch the run stopped at (the last epoch when it never did)."""
    call: int | None
    """First epoch called overfitting (onset or proved)."""
    verdicts: list[str] = field(default_factory=list)
    kept_accuracy: float = 0.0
    best_accuracy: float = 0.0
    standard_error: float = 0.0
    message: str = ""

    @property
    def kept(self) -> bool:
        return self.kept_accuracy >= self.best_accuracy - self.standard_error - 1e-12

    @property
    def outcome(self) -> str:
        if not self.truth.overfits:
            return "false alarm" if self.call is not None else "ok"
        began = self.truth.began
        if self.call is None:
            return "stopped before onset" if self.stopped < began else "missed"
        if self.call < began:
            return "early"
        return "caught" if self.call <= began + self.patience + SLACK else "late"

    patience: int = 2


def score(run: dict[str, Any], patience: int = 2, with_examples: bool = True) -> Score:
    from frostline.train.monitor import OverfitMonitor

    monitor = OverfitMonitor(patience=patience)
    history = records(run, with_examples)
    verdicts, call, stopped, message = [], None, len(history), ""
    for e in range(1, len(history) + 1):
        diagnosis = monitor.diagnose(history[:e])
        verdicts.append(diagnosis.verdict)
        if diagnosis.verdict == CALL and call is None:
            call = e
        if diagnosis.should_stop:
            stopped, message = e, diagnosis.message
            break
    kept = monitor.best_index(history[:stopped])
    accs = [r.val_accuracy for r in history]
    p = max(accs)
    return Score(
        name=run["name"],
        truth=ground_truth(run),
        stopped=stopped,
        call=call,
        verdicts=verdicts,
        kept_accuracy=accs[kept],
        best_accuracy=p,
        standard_error=math.sqrt(p * (1 - p) / run["val_size"]),
        message=message,
        patience=patience,
    )


def summary(scores: list[Score]) -> dict[str, Any]:
    healthy = [s for s in scores if not s.truth.overfits]
    overfit = [s for s in scores if s.truth.overfits]
    return {
        "runs": len(scores),
        "healthy": len(healthy),
        "false_alarms": sum(s.outcome == "false alarm" for s in healthy),
        "overfitting": len(overfit),
        "caught": sum(s.outcome in ("caught", "stopped before onset") for s in overfit),
        "early": sum(s.outcome == "early" for s in overfit),
        "late_or_missed": sum(s.outcome in ("late", "missed") for s in overfit),
        "kept": sum(s.kept for s in scores),
    }


def table(scores: list[Score], runs_by_name: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| run | epochs | n val | truth | began | called | stopped | outcome | kept acc | best acc | SE | kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scores:
        run = runs_by_name[s.name]
        lines.append(
            f"| {s.name} | {len(run['history'])} | {run['val_size']} | "
            f"{'overfits' if s.truth.overfits else 'healthy'} | {s.truth.began or '-'} | {s.call or '-'} | {s.stopped} | "
            f"{s.outcome} | {s.kept_accuracy:.4f} | {s.best_accuracy:.4f} | {s.standard_error:.4f} | "
            f"{'yes' if s.kept else 'NO'} |"
        )
    total = summary(scores)
    lines.append("")
    lines.append(
        f"{total['runs']} runs: {total['healthy']} healthy, {total['false_alarms']} false alarms; "
        f"{total['overfitting']} overfitting, {total['caught']} caught, {total['early']} early, "
        f"{total['late_or_missed']} late or missed; kept within one SE on {total['kept']} of {total['runs']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=HERE.parent / "src", help="source tree whose monitor is scored")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--aggregate", action="store_true", help="hide the per-example results from the monitor")
    parser.add_argument("--table", type=Path, help="also write the table as Markdown to this file")
    parser.add_argument("--verbose", action="store_true", help="print each run's verdicts and truth")
    args = parser.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    all_runs = runs()
    scores = [score(run, args.patience, not args.aggregate) for run in all_runs]
    text = table(scores, {r["name"]: r for r in all_runs})
    print(text)
    if args.verbose:
        for s in scores:
            print(f"\n{s.name}: {s.truth.why}\n  verdicts: {' '.join(v[:4] for v in s.verdicts)}\n  {s.message}")
    if args.table:
        args.table.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
