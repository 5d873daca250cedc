"""How well a classifier's predictions match the truth: confusion matrix, per-class precision, recall and F1.

Conventions are scikit-learn's (`classification_report`, `f1_score(average="macro")`), so figures compare with
what practitioners already compute: a class no example is predicted as has precision 0, one with no examples has
recall 0, and macro-F1 averages the classes that occur in the truth or the predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ConfusedPair:
    """Examples of class `truth` predicted as `predicted`."""

    truth: str
    predicted: str
    count: int
    of: int
    """Examples of class `truth` in all."""


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    support: int
    """Examples of this class in the truth."""
    predicted: int
    """Examples predicted as this class."""
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class Classification:
    """Counts of (true class, predicted class) over a set of examples, and what follows from them."""

    labels: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]
    """confusion[t][p]: examples of class t predicted as p (rows: truth, columns: prediction)."""

    @property
    def examples(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def accuracy(self) -> float:
        hits = sum(self.confusion[k][k] for k in range(len(self.labels)))
        return hits / self.examples if self.examples else float("nan")

    @property
    def classes(self) -> list[ClassMetrics]:
        rows = []
        for k, name in enumerate(self.labels):
            hits = self.confusion[k][k]
            support = sum(self.confusion[k])
            predicted = sum(row[k] for row in self.confusion)
            precision = hits / predicted if predicted else 0.0
            recall = hits / support if support else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            rows.append(ClassMetrics(name, support, predicted, precision, recall, f1))
        return rows

    @property
    def macro_f1(self) -> float:
        """The mean F1 of the classes that occur in the truth or the predictions."""
        present = [c.f1 for c in self.classes if c.support or c.predicted]
        return sum(present) / len(present) if present else float("nan")

    def confused_pairs(self, top: int = 5) -> list[ConfusedPair]:
        """The most frequent mistakes, most first (ties in label order)."""
        pairs = [
            ConfusedPair(self.labels[t], self.labels[p], count, sum(self.confusion[t]))
            for t, row in enumerate(self.confusion)
            for p, count in enumerate(row)
            if t != p and count
        ]
        return sorted(pairs, key=lambda pair: -pair.count)[:top]

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "labels": list(self.labels),
            "confusion": [list(row) for row in self.confusion],
            "confusion_axes": "rows: true class, columns: predicted class",
            "classes": [
                {
                    "name": c.name,
                    "support": c.support,
                    "predicted": c.predicted,
                    "precision": c.precision,
                    "recall": c.recall,
                    "f1": c.f1,
                }
                for c in self.classes
            ],
            "confused_pairs": [
                {"true": p.truth, "predicted": p.predicted, "count": p.count, "of": p.of}
                for p in self.confused_pairs(top=len(self.labels) ** 2)
            ],
        }


def classify(labels: list[str], truth: torch.Tensor, predicted: torch.Tensor) -> Classification:
    """The confusion of `predicted` against `truth` (class indices into `labels`).

    Raises:
        ValueError: the two differ in length, or an index is outside `labels`.
    """
    truth, predicted = truth.reshape(-1).long(), predicted.reshape(-1).long()
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} true labels but {len(predicted)} predictions")
    n = len(labels)
    for what, values in (("true label", truth), ("prediction", predicted)):
        if len(values) and (int(values.min()) < 0 or int(values.max()) >= n):
            raise ValueError(f"a {what} is outside the {n} classes")
    counts = torch.bincount(truth * n + predicted, minlength=n * n).reshape(n, n)
    return Classification(tuple(labels), tuple(tuple(int(c) for c in row) for row in counts.tolist()))


def macro_f1(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Macro-F1 of class indices against the truth (the classes that occur in either)."""
    classes = int(max(int(predicted.max()), int(truth.max()))) + 1 if len(truth) else 1
    return classify([str(k) for k in range(classes)], truth, predicted).macro_f1
