"""Per-batch image transforms: images are stored as uint8 and scaled, normalised and augmented per batch.

Keeping images as uint8 holds MNIST-5k at 128 px in 82 MB instead of 983 MB of float32. Augmentation
draws every random number from the batch generator, so a seeded run repeats exactly and a resumed
run continues where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from frostline.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENT_FORMS = ("none", "crop", "flip", "crop+flip")


@dataclass(frozen=True)
class Augment:
    """Random resized crop (area share in [crop_scale, 1], aspect 3/4 to 4/3) and/or horizontal flip."""

    crop_scale: float | None = 0.6
    """Smallest share of the image area a crop keeps; None: no cropping."""
    flip: bool = False
    """Mirror half of the images left to right (wrong for digits and text in images)."""

    @classmethod
    def parse(cls, form: str, crop_scale: float = 0.6) -> Augment | None:
        """`none`, `crop`, `flip` or `crop+flip` -> an Augment, or None for `none`.

        Raises:
            ConfigError: an unknown form, or a crop scale outside (0, 1].
        """
        parts = set(str(form).replace(",", "+").split("+"))
        if form == "none":
            return None
        if not parts or not parts <= {"crop", "flip"}:
            raise ConfigError(f"data.augment must be one of {', '.join(AUGMENT_FORMS)}, got {form!r}")
        if "crop" in parts and not 0 < crop_scale <= 1:
            raise ConfigError(f"data.crop_scale must be in (0, 1], got {crop_scale}")
        return cls(crop_scale=crop_scale if "crop" in parts else None, flip="flip" in parts)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a float batch (B, C, H, W); the output has the input's shape."""
        if self.crop_scale is not None:
            images = self._crop(images, generator)
        if self.flip:
            mirror = torch.rand(len(images), generator=generator) < 0.5
            images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
        return images

    def _crop(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        draws = torch.rand(n, 4, generator=generator).tolist()
        out = torch.empty_like(images)
        for i, (area_draw, ratio_draw, top_draw, left_draw) in enumerate(draws):
            area = height * width * (self.crop_scale + (1 - self.crop_scale) * area_draw)
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * ratio_draw)
            w = min(width, max(1, round(math.sqrt(area * ratio))))
            h = min(height, max(1, round(math.sqrt(area / ratio))))
            top, left = int(top_draw * (height - h + 1)), int(left_draw * (width - w + 1))
            crop = images[i : i + 1, :, top : top + h, left : left + w]
            out[i] = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
        return out


@dataclass(frozen=True)
class ImageTransform:
    """uint8 (B, C, H, W) -> float, grey expanded to RGB, augmented (training only), normalised."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    augment: Augment | None = None

    @property
    def random(self) -> bool:
        """Whether two passes over the same images give different tensors (the feature cache is off then)."""
        return self.augment is not None

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255)
        if x.shape[1] == 1 and len(self.mean) == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.augment is not None:
            if generator is None:
                raise ValueError("augmentation needs the batch generator")
            x = self.augment(x, generator)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std
