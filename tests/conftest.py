"""Tiny models and seeded fixtures shared by the suite. Real models load offline (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os
import tempfile  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# precision timings go to a folder of this session, not the user's ~/.cache (CLI subprocesses inherit it)
os.environ.setdefault("FROSTLINE_CACHE_DIR", tempfile.mkdtemp(prefix="frostline-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class SimpleModel(nn.Module):
    """The seed quiz's model: a small feature extractor and a 2-class classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 10))
        self.classifier = nn.Linear(10, 2)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x)


class TinyCNN(nn.Module):
    """Conv stem, three repeated conv+BatchNorm blocks, a final norm-free head; declared out of order."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        # declared before the stem on purpose: the map must follow forward order, not attribute order
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, num_classes))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(3)]
        )

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def tiny_bert(num_labels: int = 3, vocab_size: int = 120):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    model = BertForSequenceClassification(config)
    batch = {
        "input_ids": torch.randint(0, vocab_size, (4, 12), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
    }
    return model, batch


def tiny_vit(num_labels: int = 3):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=48,
        num_labels=num_labels,
    )
    model = ViTForImageClassification(config)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    return model, batch


@pytest.fixture
def simple_model() -> SimpleModel:
    torch.manual_seed(0)
    return SimpleModel()


@pytest.fixture
def tiny_cnn() -> tuple[TinyCNN, torch.Tensor]:
    torch.manual_seed(0)
    return TinyCNN(), torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def write_news_csv(folder, every: int, chars: int):
    """Every `every`-th BBC News article, cut to `chars` characters, as folder/news.csv (text, label)."""
    from frostline.sources.data import load_bbc_news

    data = load_bbc_news()
    rows = ["text,label"]
    for text, label in list(zip(data.texts, data.labels, strict=True))[::every]:
        rows.append('"{}",{}'.format(text[:chars].replace('"', "'"), data.label_names[label]))
    (folder / "news.csv").write_text("\n".join(rows))
    return folder / "news.csv"
