import pytest
import torch

from frostline.errors import FrozenWeightsChanged, SetupError
from frostline.freeze import freeze
from frostline.guard import FreezeGuard, check_setup


def _codes(findings):
    return {(f.severity, f.code) for f in findings}


def _step(model, optimizer, x, steps=3):
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_clean_setup_has_no_findings(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "last:1", example_batch=x)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.05)

    assert check_setup(model, optimizer, plan) == []


def test_trainable_tensors_missing_from_optimizer_is_an_error(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "last:1", example_batch=x)
    optimizer = torch.optim.AdamW(model.head.parameters())

    with pytest.raises(SetupError) as caught:
        check_setup(model, optimizer, plan)

    finding = next(f for f in caught.value.findings if f.code == "missing-from-optimizer")
    assert finding.tensors == ("blocks.2.0.weight", "blocks.2.0.bias", "blocks.2.1.weight", "blocks.2.1.bias")
    assert "4 trainable tensors are not in the optimizer" in finding.message


def test_frozen_tensors_in_optimizer_warn_then_error_once_they_can_move(tiny_cnn):
    model, x = tiny_cnn
    freeze(model, "head", example_batch=x)
    optimizer = torch.optim.AdamW(model.parameters(), weight_decay=0.1)

    findings = check_setup(model, optimizer)
    assert ("warning", "frozen-in-optimizer") in _codes(findings)

    # a gradient left over from before the freeze: AdamW's weight decay now moves the frozen stem
    model.stem.weight.grad = torch.zeros_like(model.stem.weight)
    before = model.stem.weight.detach().clone()
    with pytest.raises(SetupError, match="weight decay and momentum will still move them"):
        check_setup(model, optimizer)
    optimizer.step()
    assert not torch.equal(model.stem.weight, before)


def test_frozen_batchnorm_in_train_mode_is_an_error_unless_frostline_holds_it(tiny_cnn):
    model, x = tiny_cnn
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    model.train()

    with pytest.raises(SetupError) as caught:
        check_setup(model)
    finding = next(f for f in caught.value.findings if f.code == "batchnorm-train")
    assert finding.tensors == ("blocks.0.1", "blocks.1.1", "blocks.2.1")

    model.eval()
    assert ("warning", "batchnorm-train") in _codes(check_setup(model))

    freeze(model, "head", example_batch=x)
    model.train()
    assert check_setup(model) == []


def test_nothing_trainable_is_an_error(tiny_cnn):
    model, _ = tiny_cnn
    model.requires_grad_(False)
    model.eval()
    with pytest.raises(SetupError, match="training would change nothing"):
        check_setup(model)


def test_full_fine_tuning_is_fine_when_asked_for(tiny_cnn):
    model, x = tiny_cnn
    assert ("warning", "froze-nothing") in _codes(check_setup(model))
    plan = freeze(model, "none", example_batch=x)
    assert check_setup(model, plan=plan) == []


def test_requires_grad_changed_behind_the_plan_is_an_error(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "head", example_batch=x)
    model.stem.weight.requires_grad_(True)

    with pytest.raises(SetupError, match=r"1 tensors no longer match the freeze plan \(head\): stem.weight"):
        check_setup(model, plan=plan)


def test_a_true_module_attribute_is_a_warning(simple_model):
    simple_model.classifier.requires_grad = True
    simple_model.features.requires_grad_(False)
    findings = check_setup(simple_model)
    assert ("warning", "module-requires-grad") in _codes(findings)


def test_guard_passes_after_training_with_frozen_blocks_and_batchnorm(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "last:1", example_batch=x)
    guard = FreezeGuard(model, plan)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)

    _step(model, optimizer, x)

    report = guard.verify()
    assert report.tensors == 10
    # stem and the two frozen BatchNorms: running_mean, running_var, num_batches_tracked
    assert report.buffers == 6


def test_guard_names_a_tensor_that_moved_by_one_bit(tiny_cnn):
    model, x = tiny_cnn
    freeze(model, "head", example_batch=x)
    guard = FreezeGuard(model)

    with torch.no_grad():
        flat = model.blocks[1][0].weight.view(-1)
        flat[3] = torch.nextafter(flat[3], torch.tensor(float("inf")))

    with pytest.raises(FrozenWeightsChanged) as caught:
        guard.verify()
    assert caught.value.changed[0].startswith("blocks.1.0.weight (parameter")
    assert len(caught.value.changed) == 1


def test_guard_catches_batchnorm_statistics_drifting_in_a_hand_frozen_model(tiny_cnn):
    model, x = tiny_cnn
    for p in model.parameters():
        p.requires_grad_(False)
    guard = FreezeGuard(model)

    model.train()
    model(x)

    with pytest.raises(FrozenWeightsChanged, match="running_mean"):
        guard.verify()


def test_guard_respects_bn_train(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "head;bn=train", example_batch=x)
    guard = FreezeGuard(model, plan)

    model.train()
    model(x)

    assert guard.verify().buffers == 0
