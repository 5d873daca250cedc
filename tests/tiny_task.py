"""A tiny real task for trainer tests: an MLP on scikit-learn's digits (py:tiny_task:model / py:tiny_task:data)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn


class DigitsNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 48):
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.1)
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def model(num_classes: int = 10):
    return DigitsNet(num_classes), torch.zeros(2, 64)


def wide_model(num_classes: int = 10):
    return DigitsNet(num_classes, width=512), torch.zeros(2, 64)


def _digits():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


def data():
    x, y = _digits()
    return {"train": (x[:1200], y[:1200]), "val": (x[1200:], y[1200:]), "label_names": [str(i) for i in range(10)]}


def small_data():
    """60 training examples: enough to memorise, too few to generalise; a wide net overfits them."""
    x, y = _digits()
    return {"train": (x[:60], y[:60]), "val": (x[1200:], y[1200:]), "label_names": [str(i) for i in range(10)]}
