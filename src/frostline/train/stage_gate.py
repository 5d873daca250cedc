"""Whether a later stage can pay: read off the stage before it, before any of its cost is spent.

A stage that adapts blocks (`last:2` after the head) changes the features the head reads. What it can add by
fitting better is what the head could not fit, estimated by the head's own training error. When that error is so
small that even fixing all of it would move fewer validation examples than a paired comparison needs to tell a
gain from noise, no gain the stage makes by fitting could be shown on this validation set, and its epochs (the
costly part of a run on a CPU) would be spent choosing weights by noise. A gain through features that generalise
better is not ruled out by this; a stage with `when: always` runs regardless.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from frostline.train.evidence import SIGNIFICANT, count_of

SMALLEST_SHOWN = math.ceil(SIGNIFICANT**2)
"""The fewest validation examples a change must net to be beyond noise in a paired comparison: with d examples
changing their correctness, the change's standard error is sqrt(d) examples, so a net gain g >= SIGNIFICANT * sqrt(d)
with d >= g needs g >= SIGNIFICANT ** 2."""


@dataclass(frozen=True)
class Gate:
    """The decision on a stage with `when: needed`, and the evidence for it."""

    run: bool
    reason: str
    """The evidence, for the epoch's diagnosis."""
    summary: str = ""
    """One line for the run's stop reason, when the stage is skipped."""


def gate(records: Sequence[Any], following: Any) -> Gate:
    """Whether stage `following` (a `StageConfig` with `when: needed`) can pay, from the records of the stage
    that ran just before it (its epochs, in order)."""
    name = f"stage {following.name!r} ({following.freeze})"
    fitted = [r.train_accuracy for r in records if getattr(r, "train_accuracy", None) is not None]
    if not fitted:
        return Gate(True, f"{name} runs: the stage before it recorded no training accuracy to judge it by")
    best = max(records, key=lambda r: r.val_accuracy)
    count = count_of(best, records)
    if not count:
        return Gate(True, f"{name} runs: the size of the validation set is unknown")
    train_error = 1.0 - max(fitted)
    reachable = train_error * count
    evidence = (
        f"the previous stage fits {100 * max(fitted):.2f}% of its training examples; what adapting the features can "
        f"fix by fitting better is what it leaves unfitted, {100 * train_error:.2f}%, about {reachable:.1f} of the "
        f"{count:,d} validation examples; a paired comparison needs a net gain of {SMALLEST_SHOWN} examples to tell "
        "it from noise"
    )
    if reachable >= SMALLEST_SHOWN:
        return Gate(True, f"{name} runs: {evidence}")
    return Gate(
        False,
        f"{name} skipped: {evidence}. A gain through features that generalise better is not ruled out; set "
        f"when: always on the stage to run it anyway",
        f"stage {following.name} skipped: what the stage before it leaves unfitted ({100 * train_error:.2f}% of its "
        f"training examples) is about {reachable:.1f} of the {count:,d} validation examples, fewer than the "
        f"{SMALLEST_SHOWN} a gain needs to be told from noise",
    )
