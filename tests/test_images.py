"""Image data: folders (with broken files), MNIST-5k, per-batch transforms and augmentation, and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TinyCNN
from frostline.config import DataConfig, FitConfig, RunConfig, StageConfig
from frostline.dataset import prepare_data
from frostline.errors import ConfigError
from frostline.sources.images import load_mnist, open_image_folder
from frostline.sources.source import ModelSource
from frostline.sources.vision import vision_preprocess
from frostline.train.cache import fingerprint
from frostline.train.trainer import Trainer
from frostline.transforms import Augment, ImageTransform

LITE0 = vision_preprocess("efficientnet-lite0")


def _write_images(root, classes=("cat", "dog", "fox"), per_class=6, size=(40, 30)):
    """Solid-colour images, one colour per class, PNG and JPEG alternating."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((size[1], size[0], 3), 40 + 80 * k, dtype=np.uint8)
            pixels += rng.integers(0, 20, pixels.shape, dtype=np.uint8)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(pixels).save(folder / f"{i}{suffix}")
    return root


def test_an_image_folder_reads_every_class_and_skips_broken_files_with_a_count(tmp_path):
    root = _write_images(tmp_path / "pets")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    (root / "dog" / "truncated.jpg").write_bytes((root / "dog" / "0.jpg").read_bytes()[:60])
    (root / "dog" / "notes.txt").write_text("ignored: not an image suffix")

    data = open_image_folder(root, size=16)

    assert data.label_names == ["cat", "dog", "fox"]
    assert data.images.dtype == torch.uint8 and data.images.shape == (18, 3, 16, 16)
    assert data.labels == [0] * 6 + [1] * 6 + [2] * 6
    assert any(note.startswith("skipped 2 unreadable image file(s) of 20") for note in data.notes)
    # the class colours survive decoding and resizing
    means = [data.images[torch.tensor(data.labels) == k].float().mean().item() for k in range(3)]
    assert means[0] < means[1] < means[2]


def test_an_empty_folder_and_a_single_class_are_errors_that_say_the_layout(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds no images; lay it out as .*/<class>/<image>"):
        open_image_folder(tmp_path / "empty", size=16)
    root = _write_images(tmp_path / "one", classes=("cat",))
    with pytest.raises(ConfigError, match=r"images of 1 class\(es\) \(cat\); a classifier needs two or more"):
        open_image_folder(root, size=16)


def test_a_class_folder_with_only_broken_files_is_left_out_and_named(tmp_path):
    root = _write_images(tmp_path / "pets", classes=("cat", "dog"))
    (root / "eel").mkdir()
    (root / "eel" / "0.png").write_bytes(b"\x89PNG broken")

    data = open_image_folder(root, size=8)

    assert data.label_names == ["cat", "dog"]
    assert "class folder(s) without readable images left out: eel" in data.notes


def test_mnist_is_5000_grey_digits_500_per_class_resized():
    data = load_mnist(32)
    assert data.images.shape == (5000, 1, 32, 32) and data.images.dtype == torch.uint8
    assert np.bincount(data.labels).tolist() == [500] * 10
    assert data.label_names == [str(d) for d in range(10)]


def test_the_transform_expands_grey_and_normalises_to_the_models_range():
    transform = ImageTransform(mean=LITE0["mean"], std=LITE0["std"])
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)

    out = transform(images)

    assert out.shape == (2, 3, 1, 1)
    assert out[0].unique().tolist() == [-1.0] and out[1].unique().tolist() == [1.0]
    assert not transform.random


@pytest.mark.parametrize(
    ("form", "expected"),
    [("none", None), ("crop", Augment(0.6, False)), ("flip", Augment(None, True)), ("crop+flip", Augment(0.6, True))],
)
def test_augment_forms(form, expected):
    assert Augment.parse(form) == expected


def test_an_unknown_augment_form_is_named_with_the_choices():
    with pytest.raises(ConfigError, match=r"data.augment must be one of none, crop, flip, crop\+flip, got 'rotate'"):
        DataConfig(augment="rotate")


def test_augmentation_is_seeded_by_the_batch_generator_and_keeps_the_shape():
    images = torch.rand(6, 3, 20, 20)
    augment = Augment(crop_scale=0.3, flip=True)

    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    c = augment(images, torch.Generator().manual_seed(2))

    assert a.shape == images.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, images)


def _image_config(root, **data):
    return DataConfig(ref=str(root), image_size=12, batch_size=4, val_fraction=0.34, **data)


def test_prepared_image_batches_are_normalised_floats_and_only_training_is_augmented(tmp_path):
    root = _write_images(tmp_path / "pets")
    prepared = prepare_data(_image_config(root, augment="crop+flip"), None, seed=0, preprocess=LITE0)

    assert prepared.augment and prepared.train_transform.random and not prepared.val_transform.random
    assert len(prepared.train_labels) == 12 and len(prepared.val_labels) == 6
    (x, y) = next(iter(prepared.val_batches(4)))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 12, 12) and x.min() >= -1 and x.max() <= 1
    first = [x for x, _ in prepared.train_batches(4, seed=3)]
    again = [x for x, _ in prepared.train_batches(4, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_image_data_with_a_text_model_or_without_a_size_is_an_error(tmp_path):
    root = _write_images(tmp_path / "pets")
    with pytest.raises(ConfigError, match="is images, and the model is a text model"):
        prepare_data(_image_config(root), tokenizer=object(), seed=0, preprocess=None)
    with pytest.raises(ConfigError, match="set data.image_size"):
        prepare_data(DataConfig(ref=str(root)), None, seed=0, preprocess={})


def _fit_images(root, augment):
    config = FitConfig(
        data=_image_config(root, augment=augment),
        stages=[StageConfig(name="head", freeze="head", epochs=2, lr=1e-2)],
        run=RunConfig(precision="fp32"),
    )
    torch.manual_seed(0)
    source = ModelSource("py:tiny", TinyCNN(3), torch.zeros(2, 3, 12, 12), pretrained=True)
    notes = []
    trainer = Trainer(config, source=source)
    trainer.reporter.note = notes.append
    return trainer.fit(write=False), notes


def test_augmentation_turns_the_feature_cache_off_with_the_reason_and_none_keeps_it_on(tmp_path):
    root = _write_images(tmp_path / "pets")

    augmented, notes = _fit_images(root, "crop")
    assert all(r.cache is None for r in augmented.history)
    assert "feature cache: off: the data has random augmentation" in "\n".join(notes)

    plain, notes = _fit_images(root, "none")
    assert all(r.cache == "inputs of the head head" for r in plain.history)


def test_the_fingerprint_changes_with_the_image_transform():
    model = TinyCNN(3)
    for p in model.parameters():
        p.requires_grad_(False)
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    keys = {
        fingerprint(model, "head", [images], torch.float32, repr(ImageTransform(mean=m, std=(0.5, 0.5, 0.5))))
        for m in [(0.5, 0.5, 0.5), (0.4, 0.5, 0.5)]
    }
    assert len(keys) == 2


def test_preprocessing_comes_from_the_source():
    timm_vit = vision_preprocess("timm:vit_tiny_patch16_224")
    assert timm_vit["mean"] == (0.5, 0.5, 0.5) and timm_vit["crop_pct"] == 0.9 and timm_vit["fixed_input_size"]
    resnet = vision_preprocess("torchvision:resnet18")
    assert resnet["input_size"] == (3, 224, 224) and resnet["crop_pct"] == 224 / 256
    assert resnet["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert LITE0["mean"] == (0.5, 0.5, 0.5) and LITE0["input_size"] == (3, 224, 224)
    assert vision_preprocess("hf:minilm") is None


def test_a_fixed_size_model_names_the_size_it_takes(tmp_path):
    root = _write_images(tmp_path / "pets")
    with pytest.raises(ConfigError, match="takes 224 x 224 pixel images only; set data.image_size to 224"):
        prepare_data(_image_config(root), None, seed=0, preprocess=vision_preprocess("timm:vit_tiny_patch16_224"))
