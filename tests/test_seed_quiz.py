"""The seed quiz's cases, answered by frostline in code (../shared/seed-quiz.md)."""

import pytest
import torch

from conftest import SimpleModel
from frostline import FreezeGuard, SetupError, check_setup, freeze, inspect_model


def test_q3_freezing_all_but_classifier_leaves_two_tensors_and_22_parameters(simple_model):
    plan = freeze(simple_model, "head", example_batch=torch.randn(2, 10))

    assert inspect_model(simple_model, torch.randn(2, 10)).head == "classifier"
    assert plan.trainable_tensors == 2
    assert plan.trainable_params == 22
    assert plan.trainable_tensors_before == 6
    assert sorted(plan.trainable) == ["classifier.bias", "classifier.weight"]
    assert len([p for p in simple_model.parameters() if p.requires_grad]) == 2


def test_q3_the_quiz_loop_and_frostline_agree(simple_model):
    for param in simple_model.features.parameters():
        param.requires_grad = False
    by_hand = [p for p in simple_model.parameters() if p.requires_grad]

    model_map = inspect_model(simple_model, torch.randn(2, 10))

    assert len(by_hand) == 2
    assert model_map.trainable_tensors == 2
    assert model_map.trainable_params == 22


def test_q5_module_attribute_is_reported_as_freezing_nothing_with_the_fix(simple_model):
    simple_model.features.requires_grad = False  # the classic no-op

    with pytest.raises(SetupError) as caught:
        check_setup(simple_model)

    finding = next(f for f in caught.value.findings if f.code == "module-requires-grad")
    assert finding.severity == "error"
    assert "froze nothing" in finding.message
    assert "model.features.requires_grad_(False)" in finding.fix
    assert any(f.code == "froze-nothing" for f in caught.value.findings)
    assert all(p.requires_grad for p in simple_model.features.parameters())


def test_q5_parameters_loop_freezes_and_the_guard_proves_it(simple_model):
    for param in simple_model.features.parameters():
        param.requires_grad = False
    optimizer = torch.optim.AdamW([p for p in simple_model.parameters() if p.requires_grad], weight_decay=0.1)
    assert check_setup(simple_model, optimizer) == []
    guard = FreezeGuard(simple_model)
    head_before = simple_model.classifier.weight.detach().clone()

    for _ in range(3):
        optimizer.zero_grad()
        simple_model(torch.randn(8, 10)).sum().backward()
        optimizer.step()

    assert guard.verify().tensors == 4
    assert not torch.equal(simple_model.classifier.weight, head_before)


def test_q1_early_layers_frozen_final_layers_train():
    model = SimpleModel()
    plan = freeze(model, "last:1", example_batch=torch.randn(2, 10))

    trains = {e.path: e.trainable_tensors_after > 0 for e in plan.entries}
    assert trains == {"features.0": False, "features.2": True, "classifier": True}
