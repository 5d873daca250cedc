"""Running a model from a block boundary: how the feature cache skips the frozen part.

A `Tail` knows how to capture the inputs of the first trainable entry (the frozen part's output)
and how to run the rest of the model from them. The head needs nothing but a hook, so head-only
stages work on any model; deeper boundaries need the model family's remaining forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from frostline.batches import Batch, call_model, logits_of
from frostline.inspect import ModelMap
from frostline.sources.sentence import SentenceClassifier, pool
from frostline.train.runtime import eval_mode

Features = torch.Tensor | dict[str, torch.Tensor]


class _Captured(Exception):
    """Raised by a capture hook to end a forward pass once the boundary's inputs are in hand."""


@dataclass
class Tail:
    """The trainable remainder of a model, run from cached features."""

    boundary: str
    """The entry whose inputs are cached."""
    describe: str
    """What is cached, for people."""
    capture: Callable[[Batch], Features]
    """The frozen part's output for a batch (called under inference mode)."""
    forward: Callable[[Features], torch.Tensor]
    """Logits from cached features."""
    modules: list[nn.Module]
    """The modules the tail runs (put in train or eval mode by the loop)."""
    entry: nn.Module
    """The module whose inputs the features are."""
    from_inputs: Callable[[tuple, Batch], Features]
    """The features, from the arguments `entry` receives when the model runs a batch: how a pass made for another
    tail can keep this one's features too (`capture_together`)."""


def _capture_input(model: nn.Module, module: nn.Module, batch: Batch, stop: bool) -> tuple[tuple, Any]:
    """The positional arguments `module` receives when `model` runs `batch`, and the model's output."""
    seen: list[tuple] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        seen.append(args)
        if stop:
            raise _Captured

    handle = module.register_forward_pre_hook(hook)
    output = None
    try:
        output = call_model(model, batch)
    except _Captured:
        pass
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(f"the module ran {len(seen)} times in one forward pass")
    return seen[0], output


def head_tail(model: nn.Module, model_map: ModelMap) -> Tail:
    """Cache the head's input: works on any model whose output is the head's output."""
    head = model.get_submodule(model_map.head) if model_map.head else model

    def capture(batch: Batch) -> torch.Tensor:
        # eval mode: a dropout inside the trainable head must not make the check below fail by chance
        with eval_mode(model):
            args, output = _capture_input(model, head, batch, stop=False)
            features = _single_tensor(args)
            logits = logits_of(head(features))
        # the head's output must be the model's output, or replaying the head alone would be wrong
        if not torch.allclose(logits.float(), logits_of(output).float(), atol=1e-5, rtol=1e-4):
            raise ValueError(f"the model changes the output of its head {model_map.head!r}")
        return features

    return Tail(
        model_map.head,
        f"inputs of the head {model_map.head}",
        capture,
        lambda f: logits_of(head(f)),
        [head],
        head,
        lambda args, batch: _single_tensor(args),
    )


def _single_tensor(args: tuple) -> torch.Tensor:
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise ValueError("the head takes more than one tensor")
    return args[0]


def capture_together(
    model: nn.Module, tail: Tail, others: list[Tail], batch: Batch
) -> tuple[Features, list[Features | None]]:
    """`tail`'s features for `batch` and, from the same forward pass, those of `others` (None for one whose entry
    did not run exactly once before the pass ended, as a block tail's pass stops at its own boundary, or that cannot
    cache this batch).

    The pass runs with every module in eval mode. That gives `tail` what its own capture gives (the frozen part it
    reads is held in eval mode), and `others` what their stages' passes would give, for a stage whose cache is valid
    (`plan_cache`: its frozen part deterministic, held in eval mode) and whose frozen weights are the same then.
    """
    seen: list[list[tuple]] = [[] for _ in others]
    handles = [
        other.entry.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(args))
        for other, calls in zip(others, seen, strict=True)
    ]
    try:
        with eval_mode(model):
            features = tail.capture(batch)
    finally:
        for handle in handles:
            handle.remove()
    return features, [_kept(other, calls, batch) for other, calls in zip(others, seen, strict=True)]


def _kept(tail: Tail, calls: list[tuple], batch: Batch) -> Features | None:
    if len(calls) != 1:
        return None
    try:
        return tail.from_inputs(calls[0], batch)
    except ValueError:
        return None  # features this tail cannot cache: its own stage's pass says why


def block_tail(model: nn.Module, model_map: ModelMap, boundary: str) -> Tail | str:
    """A tail that starts at block `boundary`; the reason as a string when the family is not supported."""
    if isinstance(model, SentenceClassifier) and _bert_like(model.encoder):
        return _bert_tail(model, model.encoder, boundary, finish=lambda h, m: model.classifier(_sentence(model, h, m)))
    bert = getattr(model, "bert", None)
    if bert is not None and _bert_like(bert) and isinstance(getattr(model, "classifier", None), nn.Module):
        return _bert_tail(model, bert, boundary, finish=lambda h, m: model.classifier(model.dropout(bert.pooler(h))))
    if isinstance(model, nn.Sequential):
        return _sequential_tail(model, boundary)
    if type(model).__module__.startswith("efficientnet_lite_pytorch") and not model._global_params.local_pooling:
        return _efficientnet_lite_tail(model, boundary)
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)) and (
        hasattr(model, "forward_head") or hasattr(model, "fc")
    ):
        return _resnet_tail(model, boundary)
    if (
        isinstance(getattr(model, "blocks", None), nn.Sequential)
        and hasattr(model, "forward_head")
        and hasattr(model, "norm")
    ):
        return _vit_tail(model, boundary)
    return (
        f"no way to run {type(model).__name__} from block {boundary} is known (BERT-like encoders, timm/torchvision "
        "ResNets, timm ViTs, efficientnet-lite and nn.Sequential are)"
    )


def _sentence(model: SentenceClassifier, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pooled = pool(hidden, mask, model.pooling)
    return torch.nn.functional.normalize(pooled, dim=-1) if model.normalize else pooled


def _bert_like(encoder: nn.Module) -> bool:
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    return isinstance(layers, nn.ModuleList) and hasattr(encoder, "embeddings")


def _bert_tail(model: nn.Module, encoder: nn.Module, boundary: str, finish: Callable) -> Tail | str:
    names = {m: p for p, m in model.named_modules()}
    layers = list(encoder.encoder.layer)
    paths = [names[layer] for layer in layers]
    if boundary not in paths:
        return f"{boundary} is not a layer of {type(encoder).__name__}"
    start = paths.index(boundary)

    def one_window(batch: Batch) -> None:
        if batch["input_ids"].dim() == 3:
            raise ValueError(
                f"the texts are read in several windows (data.windows), and token states at {boundary} are cached "
                "per text only for one window"
            )

    def from_inputs(args: tuple, batch: Batch) -> dict[str, torch.Tensor]:
        one_window(batch)
        return {"hidden": args[0], "attention_mask": batch["attention_mask"]}

    def capture(batch: Batch) -> dict[str, torch.Tensor]:
        one_window(batch)  # the reason before any work
        return from_inputs(_capture_input(model, layers[start], batch, stop=True)[0], batch)

    def forward(features: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, mask = features["hidden"], features["attention_mask"]
        if hasattr(encoder, "_create_attention_masks"):
            extended = encoder._create_attention_masks(
                attention_mask=mask,
                encoder_attention_mask=None,
                embedding_output=hidden,
                encoder_hidden_states=None,
                cache=None,
            )[0]
        else:
            extended = encoder.get_extended_attention_mask(mask, hidden.shape[:2])
        for layer in layers[start:]:
            out = layer(hidden, extended)
            hidden = out[0] if isinstance(out, tuple) else out
        return logits_of(finish(hidden, mask))

    after = [m for n, m in encoder.named_children() if n not in ("embeddings", "encoder")]
    modules = [*layers[start:], *after, *(m for m in model.children() if m is not encoder)]
    return Tail(
        boundary,
        f"inputs of {boundary} (token states + attention mask)",
        capture,
        forward,
        modules,
        layers[start],
        from_inputs,
    )


def _sequential_tail(model: nn.Sequential, boundary: str) -> Tail | str:
    names = [name for name, _ in model.named_children()]
    if boundary not in names:
        return f"{boundary} is not a direct child of the nn.Sequential model"
    rest = model[names.index(boundary) :]
    return _input_tail(model, rest[0], boundary, f"inputs of {boundary}", lambda f: rest(f), [rest])


def _input_tail(
    model: nn.Module,
    entry: nn.Module,
    boundary: str,
    describe: str,
    forward: Callable[[Features], torch.Tensor],
    modules: list[nn.Module],
) -> Tail:
    """A tail whose features are the first positional input of `entry`."""

    def capture(batch: Batch) -> torch.Tensor:
        return _capture_input(model, entry, batch, stop=True)[0][0]

    return Tail(boundary, describe, capture, forward, modules, entry, lambda args, batch: args[0])


def _efficientnet_lite_tail(model: nn.Module, boundary: str) -> Tail | str:
    blocks = list(model._blocks)
    paths = [f"_blocks.{i}" for i in range(len(blocks))]
    if boundary not in paths:
        return f"{boundary} is not one of EfficientNet's _blocks"
    start = paths.index(boundary)
    rate = model._global_params.drop_connect_rate

    def forward(x: torch.Tensor) -> torch.Tensor:
        # the same per-block drop-connect schedule as EfficientNet.extract_features
        for idx in range(start, len(blocks)):
            x = blocks[idx](x, drop_connect_rate=rate * idx / len(blocks) if rate else rate)
        x = model._swish(model._bn1(model._conv_head(x)))
        return model._fc(model._dropout(model._avg_pooling(x).flatten(1)))

    modules = [*blocks[start:], model._conv_head, model._bn1, model._dropout, model._fc]
    return _input_tail(model, blocks[start], boundary, f"inputs of {boundary}", forward, modules)


def _resnet_tail(model: nn.Module, boundary: str) -> Tail | str:
    order = [(f"layer{i}.{j}", block) for i in range(1, 5) for j, block in enumerate(getattr(model, f"layer{i}"))]
    paths = [p for p, _ in order]
    if boundary not in paths:
        return f"{boundary} is not a ResNet block"
    start = paths.index(boundary)
    rest = [block for _, block in order[start:]]

    def forward(x: torch.Tensor) -> torch.Tensor:
        for block in rest:
            x = block(x)
        if hasattr(model, "forward_head"):
            return model.forward_head(x)
        return model.fc(torch.flatten(model.avgpool(x), 1))

    tail_modules = [
        m
        for n, m in model.named_children()
        if not n.startswith("layer") and n not in ("conv1", "bn1", "act1", "relu", "maxpool")
    ]
    return _input_tail(model, rest[0], boundary, f"inputs of {boundary}", forward, [*rest, *tail_modules])


def _vit_tail(model: nn.Module, boundary: str) -> Tail | str:
    blocks = list(model.blocks)
    paths = [f"blocks.{i}" for i in range(len(blocks))]
    if boundary not in paths:
        return f"{boundary} is not one of the transformer's blocks"
    start = paths.index(boundary)

    def forward(x: torch.Tensor) -> torch.Tensor:
        for block in blocks[start:]:
            x = block(x)
        return model.forward_head(model.norm(x))

    after = [m for n, m in model.named_children() if n in ("norm", "fc_norm", "head_drop", "head")]
    return _input_tail(
        model, blocks[start], boundary, f"inputs of {boundary} (token states)", forward, [*blocks[start:], *after]
    )
