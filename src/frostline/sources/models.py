"""Model references -> models: `open_model` (with notes and tokenizer) and `load_model` (model + batch).

References:
    hf:PATH               transformers sequence classification from a local folder; hf:minilm is the
                          bundled offline MiniLM sentence encoder (encoder + mean pooling + linear head)
    efficientnet-lite0    the offline EfficientNet-Lite0 package with ImageNet weights
    timm:NAME             a timm model (pretrained weights if in the local cache, else random)
    torchvision:NAME      a torchvision model (pretrained weights if in torch hub's cache, else random)
    py:module:factory     your own: factory(num_classes=...) returns a model, or (model, example_batch)
"""

from __future__ import annotations

import difflib
import importlib
import inspect as pyinspect
import os
import sys

from torch import nn

from frostline.batches import Batch
from frostline.errors import ModelRefError
from frostline.sources.heads import replace_head
from frostline.sources.source import ModelSource

SCHEMES = ["hf", "timm", "torchvision", "py"]
FORMS = ["hf:PATH", "hf:minilm", "efficientnet-lite0", "timm:NAME", "torchvision:NAME", "py:module:factory"]


def open_model(ref: str, num_classes: int | None = None) -> ModelSource:
    """Resolve a model reference into a `ModelSource`.

    Args:
        ref: a model reference (see the module docstring).
        num_classes: size of the new head; None keeps the source's own head.

    Raises:
        ModelRefError: the reference names nothing that can be loaded here, with the fix.
    """
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ModelRefError(f"num_classes must be a whole number >= 1, got {num_classes!r}")
    scheme, sep, rest = ref.partition(":")
    if sep and scheme == "hf":
        from frostline.sources.text import open_text_model

        return open_text_model(rest, num_classes)
    if sep and scheme == "timm":
        from frostline.sources.vision import open_timm

        return open_timm(rest, num_classes)
    if sep and scheme == "torchvision":
        from frostline.sources.vision import open_torchvision

        return open_torchvision(rest, num_classes)
    if sep and scheme == "py":
        return open_python(rest, num_classes)
    if ref == "efficientnet-lite0":
        from frostline.sources.vision import open_efficientnet_lite0

        return open_efficientnet_lite0(num_classes)
    if sep:
        close = [f"{s}:{rest}" for s in difflib.get_close_matches(scheme, SCHEMES, n=1, cutoff=0.5)]
    else:
        close = difflib.get_close_matches(ref, FORMS, n=2, cutoff=0.4)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ModelRefError(f"unknown model reference {ref!r}{hint}; the forms are {', '.join(FORMS)}")


def load_model(ref: str, num_classes: int | None = None) -> tuple[nn.Module, Batch]:
    """Resolve a model reference into `(model, example_batch)`; see `open_model` for the rest."""
    source = open_model(ref, num_classes)
    return source.model, source.example_batch


def open_tokenizer(ref: str):
    """The tokenizer of a text model reference (hf:...), without loading the model; None for other models."""
    scheme, _, rest = ref.partition(":")
    if scheme != "hf":
        return None
    from frostline.sources.text import open_tokenizer as open_hf_tokenizer

    return open_hf_tokenizer(rest)


def open_preprocess(ref: str) -> dict | None:
    """The input conventions of an image model reference, without loading the model; None for other models."""
    from frostline.sources.vision import vision_preprocess

    return vision_preprocess(ref)


def open_python(target: str, num_classes: int | None) -> ModelSource:
    """`py:module:factory`: import `module` (the working folder is searched too) and call `factory`."""
    module_name, sep, factory_name = target.partition(":")
    if not sep or not module_name or not factory_name:
        raise ModelRefError(f"py:{target} should read py:module:factory, for example py:my_models:build")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelRefError(f"py:{target}: cannot import {module_name!r} ({err})") from err
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        close = difflib.get_close_matches(factory_name, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"callables there: {', '.join(names[:10])}"
        raise ModelRefError(f"py:{target}: {module_name} has no callable {factory_name!r}; {hint}")
    takes_classes = "num_classes" in pyinspect.signature(factory).parameters
    made = factory(num_classes=num_classes) if takes_classes and num_classes is not None else factory()
    model, example = made if isinstance(made, tuple) else (made, getattr(made, "example_input_array", None))
    if not isinstance(model, nn.Module):
        raise ModelRefError(
            f"py:{target} returned {type(model).__name__}, not an nn.Module (or (nn.Module, example_batch))"
        )
    if example is None:
        raise ModelRefError(
            f"py:{target} returned a model without an example batch; return (model, example_batch) "
            "or set model.example_input_array"
        )
    notes = [f"{type(model).__name__} from {module_name}.{factory_name}()"]
    if num_classes is not None and not takes_classes:
        from frostline.inspect import inspect_model

        head = inspect_model(model, example).head
        notes.append(replace_head(model, head, num_classes))
    return ModelSource(ref=f"py:{target}", model=model, example_batch=example, pretrained=True, notes=notes)
