"""Acceptance on real architectures: the head is right, last:2 trains exactly the last two blocks and
what follows them, and after 3 AdamW steps with weight decay every frozen tensor and BatchNorm buffer
is bit-identical while every trainable tensor moved."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_bert, tiny_vit
from frostline import FreezeGuard, check_setup, freeze, inspect_model, open_model
from frostline.batches import call_model, logits_of

# ref -> (head, number of blocks, entries after the last block besides the head)
CASES = {
    "hf:minilm": ("classifier", 6, []),
    "efficientnet-lite0": ("_fc", 16, ["_conv_head", "_bn1"]),
    "torchvision:resnet18": ("fc", 8, []),
    "timm:resnet18": ("fc", 8, []),
    "timm:vit_tiny_patch16_224": ("head", 12, ["norm"]),
    "tiny-bert": ("classifier", 4, ["bert.pooler"]),
    "tiny-vit": ("classifier", 4, ["vit.layernorm"]),
}


def _load(ref):
    if ref == "tiny-bert":
        return tiny_bert(num_labels=5)
    if ref == "tiny-vit":
        return tiny_vit(num_labels=5)
    torch.manual_seed(0)
    source = open_model(ref, num_classes=5)
    return source.model, source.example_batch


@pytest.mark.slow
@pytest.mark.parametrize("ref", list(CASES))
def test_last2_freezes_exactly_and_frozen_tensors_never_move(ref):
    head, n_blocks, tail = CASES[ref]
    model, batch = _load(ref)
    model_map = inspect_model(model, batch)

    assert model_map.head == head
    assert len(model_map.blocks) == n_blocks

    plan = freeze(model, "last:2", model_map)
    expected = {n for e in model_map.blocks[-2:] for n in e.param_names}
    expected |= {n for path in [*tail, head] for n in model_map.entry(path).param_names}
    assert plan.trainable == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    check_setup(model, optimizer, plan)
    guard = FreezeGuard(model, plan)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen_bn = set(plan.held_in_eval)
    buffers_before = {n: b.clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[0] in frozen_bn}
    labels = torch.arange(2) % 5

    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        logits = logits_of(call_model(model, batch))
        F.cross_entropy(logits, labels.repeat(len(logits) // 2 + 1)[: len(logits)]).backward()
        optimizer.step()

    for name, param in model.named_parameters():
        if name in expected:
            assert not torch.equal(param, params_before[name]), f"{name} is trainable and did not move"
        else:
            assert torch.equal(param, params_before[name]), f"{name} is frozen and moved"
    for name, buffer in model.named_buffers():
        if name in buffers_before:
            assert torch.equal(buffer, buffers_before[name]), f"frozen BatchNorm buffer {name} moved"
    report = guard.verify()
    assert report.tensors == len(params_before) - len(expected)
    if "resnet" in ref or ref == "efficientnet-lite0":
        assert len(buffers_before) > 0
