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


class BlocksNet(nn.Module):
    """An MLP with repeated blocks for tests with several processes: no dropout (the processes' masks could not match
    one process's), and a trainable module the forward pass never runs (`spare`). With `aux`, an auxiliary head
    that runs only in training (as Inception's): a forward in eval mode never reaches it."""

    def __init__(self, aux: bool = False):
        super().__init__()
        self.stem = nn.Linear(64, 48)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(48, 48), nn.ReLU()) for _ in range(3)])
        self.spare = nn.Linear(48, 48)
        self.head = nn.Linear(48, 10)
        self.aux = nn.Linear(48, 10) if aux else None

    def forward(self, x):
        features = self.blocks(torch.relu(self.stem(x)))
        logits = self.head(features)
        return logits + 0.1 * self.aux(features) if self.aux is not None and self.training else logits


def blocks_net(aux: bool = False) -> BlocksNet:
    """`BlocksNet` with the same initial weights every time."""
    torch.manual_seed(0)
    return BlocksNet(aux)
