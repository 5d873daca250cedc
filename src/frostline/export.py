"""A run's best model as a self-contained folder that runs without frostline: TorchScript, ONNX, or transformers.

Every export is checked before it is called done: the exported model is loaded with its own runtime
(`torch.jit.load`, onnxruntime, `transformers.pipeline`) and its logits are compared with frostline's own on
examples of the run's validation data. A LoRA run is exported merged (each adapter folded into the weight it
adapts), so the check also proves the merged model gives the adapted model's logits. The folder holds what a reader needs besides the model: the labels in
order, the tokenizer (text) or the preprocessing written down (images), and `frostline-export.json`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frostline.adapters import merge_lora
from frostline.batches import logits_of
from frostline.checkpoint import atomic_write_text
from frostline.errors import ConfigError
from frostline.runs import TrainedRun
from frostline.sources.sentence import SentenceClassifier

FORMATS = ("torchscript", "onnx", "hf")
TOLERANCE = 1e-4
"""Largest difference between the export's logits and frostline's own that counts as the same model."""


@dataclass
class Exported:
    folder: Path
    format: str
    files: list[str]
    checked: str
    """How the export was checked, for people: the runtime, the examples, the largest logit difference."""
    notes: list[str] = field(default_factory=list)
    """What else was done to the model on the way (LoRA adapters merged)."""


class _TextLogits(nn.Module):
    """The run's text model as a function of (input_ids, attention_mask) -> logits: the signature runtimes call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(input_ids=input_ids, attention_mask=attention_mask))


class _ImageLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(pixels))


def export(trained: TrainedRun, fmt: str, folder: Path, examples: int = 8) -> Exported:
    """Write `trained`'s model to `folder` in format `fmt`, then load it back with that format's runtime and check
    its logits against frostline's on `examples` validation examples.

    Raises:
        ConfigError: an unknown format, a model the format cannot hold (with the reason), a missing runtime
            (with the pip command), or an export whose logits differ beyond `TOLERANCE`.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if trained.windows > 1:
        raise ConfigError(
            f"the run reads each text in {trained.windows} windows (data.windows); an exported graph reads one "
            "window of max_length tokens, so it would not be the model that was evaluated"
        )
    if fmt == "hf":
        _check_hf(trained)
    model = trained.model.float().eval()
    inputs, what = _sample_inputs(trained, examples)
    with torch.inference_mode():
        expected = logits_of(model(**inputs) if isinstance(inputs, dict) else model(inputs)).float()
    # the expected logits are the adapted model's: the check below proves the merged model gives them
    merged = merge_lora(model)
    notes = [f"merged the LoRA adapters of {merged:,d} modules into their weights (peft)"] if merged else []
    folder.mkdir(parents=True, exist_ok=True)
    export_format = {"torchscript": _torchscript, "onnx": _onnx, "hf": _hf}[fmt]
    files, runtime, got = export_format(trained, model, inputs, expected, folder)
    files += _write_reader_files(trained, fmt, folder)
    return Exported(folder, fmt, files, _compare(expected, got, runtime, what), notes)


def _sample_inputs(trained: TrainedRun, n: int) -> tuple[Any, str]:
    """A few inputs as the model reads them, and what they are: the run's validation examples where it can find
    them, else made-up ones (a run whose split cannot be found again), said as such."""
    try:
        examples = trained.validation()
    except ConfigError:
        if trained.reads_images:
            size = trained.config.data.image_size or 224
            return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)), f"{n} random images"
        return trained.encode(["an example text to check the export with", "and another"]), "2 example texts"
    inputs = examples.inputs
    count = f"{min(n, len(examples.labels))} validation examples"
    if isinstance(inputs, dict):
        return {k: v[:n] for k, v in inputs.items() if k in ("input_ids", "attention_mask")}, count
    batch = inputs[:n]
    return (examples.transform(batch, None) if examples.transform is not None else batch), count


def _compare(expected: torch.Tensor, got: Any, runtime: str, what: str) -> str:
    got = torch.as_tensor(got).float()
    if got.shape != expected.shape:
        raise ConfigError(f"the exported model gives logits of shape {tuple(got.shape)}, not {tuple(expected.shape)}")
    worst = float((got - expected).abs().max())
    if not worst <= TOLERANCE:
        raise ConfigError(
            f"the exported model's logits differ from frostline's by up to {worst:.2e} on {what} "
            f"(tolerance {TOLERANCE:g}); it was not kept as a faithful export"
        )
    return f"loaded with {runtime}: logits within {worst:.1e} of frostline's on {what}"


def _wrapped(trained: TrainedRun, model: nn.Module) -> nn.Module:
    return _ImageLogits(model) if trained.reads_images else _TextLogits(model)


def _args(inputs: Any) -> tuple[torch.Tensor, ...]:
    return (inputs["input_ids"], inputs["attention_mask"]) if isinstance(inputs, dict) else (inputs,)


def _torchscript(trained, model, inputs, expected, folder: Path) -> tuple[list[str], str, Any]:
    wrapper = _wrapped(trained, model).eval()
    args = _args(inputs)
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(wrapper, args, check_trace=False, strict=False)
    path = folder / "model.pt"
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    # another batch shape than the traced one: a graph that baked in the trace's size fails here
    shorter = tuple(a[: max(1, len(a) - 1)] for a in args)
    with torch.no_grad():
        _compare(expected[: len(shorter[0])], loaded(*shorter), "torch.jit.load", "a shorter batch")
        return ["model.pt"], "torch.jit.load", loaded(*args)


def _onnx(trained, model, inputs, expected, folder: Path) -> tuple[list[str], str, Any]:
    try:
        import onnxruntime
    except ImportError as err:
        raise ConfigError("--format onnx needs onnx and onnxruntime: pip install 'frostline[export]'") from err
    wrapper = _wrapped(trained, model).eval()
    args = _args(inputs)
    names = ["pixels"] if trained.reads_images else ["input_ids", "attention_mask"]
    axes = {name: {0: "batch"} if trained.reads_images else {0: "batch", 1: "tokens"} for name in names}
    path = folder / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes={**axes, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: a.numpy() for name, a in zip(names, args, strict=True)}
    return ["model.onnx"], f"onnxruntime {onnxruntime.__version__}", session.run(["logits"], feed)[0]


def _check_hf(trained: TrainedRun) -> None:
    """Refuse, before any work, a model that --format hf cannot write.

    Raises:
        ConfigError: transformers is missing, or the model is not a transformers model (with the formats that work).
    """
    try:
        from transformers import PreTrainedModel
    except ImportError as err:
        raise ConfigError("--format hf needs transformers: pip install 'frostline[text]'") from err
    model = trained.model
    if not isinstance(model, PreTrainedModel):
        why = (
            ": a sentence encoder with a pooling head, which no transformers class reads"
            if isinstance(model, SentenceClassifier)
            else ""
        )
        raise ConfigError(
            f"--format hf writes a transformers model, and {type(model).__name__} (model.ref "
            f"{trained.config.model.ref}) is not one{why}; use --format onnx or torchscript"
        )


def _hf(trained, model, inputs, expected, folder: Path) -> tuple[list[str], str, Any]:
    from transformers import pipeline

    model.config.id2label = dict(enumerate(trained.labels))
    model.config.label2id = {name: i for i, name in enumerate(trained.labels)}
    model.save_pretrained(str(folder), safe_serialization=True)
    trained.tokenizer.save_pretrained(str(folder))
    classify = pipeline("text-classification", model=str(folder), tokenizer=str(folder), top_k=None, device="cpu")
    reloaded = classify.model.eval()
    with torch.inference_mode():
        got = logits_of(reloaded(**inputs))
    return sorted(p.name for p in folder.iterdir() if p.is_file()), "transformers.pipeline", got


def _write_reader_files(trained: TrainedRun, fmt: str, folder: Path) -> list[str]:
    """The labels, the input conventions and the tokenizer: what a reader needs besides the model."""
    files = []
    record: dict[str, Any] = {
        "format": fmt,
        "labels": trained.labels,
        "run": str(trained.folder),
        "model_ref": trained.config.model.ref,
        "output": "logits (batch, classes); softmax gives the probabilities; class i is labels[i]",
    }
    if trained.reads_images:
        from frostline.dataset import image_settings

        size, crop_pct, transform = image_settings(trained.config.data, None, trained.preprocess)
        record["inputs"] = {
            "pixels": "float32 (batch, 3, size, size), RGB",
            "size": size,
            "crop_pct": crop_pct,
            "decode": "PIL: Image.open(path); image.draft('RGB', (size, size)) (JPEG: decoded at a reduced scale "
            "no smaller than size); image.convert('RGB')",
            "resize": "scale = size / crop_pct / min(width, height); PIL resize to (max(size, round(width * scale)), "
            "max(size, round(height * scale))), Image.Resampling.BILINEAR",
            "crop": "centre: left = (W - size) // 2, top = (H - size) // 2, size x size",
            "scale": "pixel values / 255",
            "mean": list(transform.mean),
            "std": list(transform.std),
            "normalise": "(pixels / 255 - mean) / std, per channel",
        }
    else:
        record["inputs"] = {
            "input_ids": "int64 (batch, tokens)",
            "attention_mask": "int64 (batch, tokens), 1 for tokens, 0 for padding",
            "max_length": trained.max_length,
            "tokenizer": "the files in this folder: transformers.AutoTokenizer.from_pretrained(FOLDER)",
            "truncation": f"texts longer than {trained.max_length} tokens are cut to their first {trained.max_length}",
        }
        if fmt != "hf" and trained.tokenizer is not None:
            trained.tokenizer.save_pretrained(str(folder))
            files += ["tokenizer files"]
    atomic_write_text(folder / "frostline-export.json", json.dumps(record, indent=1) + "\n")
    files.append("frostline-export.json")
    return files


def prepare_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a folder that already holds files unless `overwrite` (then only an earlier export is replaced).

    Raises:
        ConfigError: the folder holds files and `overwrite` is off, or it holds files that are not an export's.
    """
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output {folder} is a file; name a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise ConfigError(f"--output {folder} is not empty; pass --overwrite to replace an earlier export there")
        if not (folder / "frostline-export.json").is_file():
            raise ConfigError(
                f"--output {folder} holds files that are not a frostline export; name an empty or new folder"
            )
        shutil.rmtree(folder)
