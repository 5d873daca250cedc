import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from frostline import freeze
from frostline.errors import ConfigError
from frostline.lr_finder import lr_find
from frostline.optim import param_groups


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, order[:1400], order[1400:]


def _batches(x, y, idx, seed, size=32):
    order = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(order), size)]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _val_loss_after_3_epochs(digits, lr):
    x, y, train, val = digits
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for epoch in range(3):
        for xb, yb in _batches(x, y, train, seed=epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    with torch.no_grad():
        return F.cross_entropy(model(x[val]), y[val]).item()


def test_suggested_rate_beats_100x_larger_and_100x_smaller_on_digits(digits):
    x, y, train, _ = digits
    result = lr_find(_mlp(), _batches(x, y, train, seed=0), start_lr=1e-6, end_lr=10, num_steps=100)

    assert result.method == "valley"
    assert 1e-3 < result.suggestion < 1e-1
    suggested = _val_loss_after_3_epochs(digits, result.suggestion)
    assert suggested < _val_loss_after_3_epochs(digits, result.suggestion * 100)
    assert suggested < _val_loss_after_3_epochs(digits, result.suggestion / 100)
    assert suggested < 0.5


def test_the_sweep_stops_on_divergence_and_reports_both_heuristics(digits):
    x, y, train, _ = digits
    result = lr_find(_mlp(), _batches(x, y, train, seed=0), start_lr=1e-6, end_lr=10, num_steps=100)

    assert result.stopped.startswith("loss diverged at rate")
    assert len(result.lrs) < 100
    assert result.steepest is not None and result.valley is not None
    assert result.lrs == sorted(result.lrs)
    assert result.lrs[0] == pytest.approx(1e-6)


def test_model_optimizer_and_batchnorm_are_bit_identical_afterwards(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "last:1", example_batch=x)
    optimizer = torch.optim.AdamW(param_groups(model, plan, 1e-3, layer_decay=0.5), weight_decay=0.1)
    labels = torch.tensor([0, 1, 2, 0])
    # give the optimizer some state first, so restoring it is tested too
    F.cross_entropy(model(x), labels).backward()
    optimizer.step()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    rates = [g["lr"] for g in optimizer.param_groups]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()

    lr_find(model, [(x, labels)] * 3, optimizer, num_steps=20, start_lr=1e-4, end_lr=1.0)

    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [g["lr"] for g in optimizer.param_groups] == rates
    for p, s in optimizer.state.items():
        assert all(torch.equal(opt_state[id(p)][k], v) for k, v in s.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_discriminative_groups_keep_their_ratios_during_the_sweep(tiny_cnn):
    model, x = tiny_cnn
    plan = freeze(model, "last:2", example_batch=x)
    optimizer = torch.optim.AdamW(param_groups(model, plan, 1e-3, layer_decay=0.5, head_lr_mult=10))
    seen = []

    original_step = optimizer.step

    def step(*args, **kwargs):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return original_step(*args, **kwargs)

    optimizer.step = step
    labels = torch.tensor([0, 1, 2, 0])
    result = lr_find(model, [(x, labels)], optimizer, num_steps=10, start_lr=1e-5, end_lr=1e-2)

    scales = [g["lr_scale"] for g in optimizer.param_groups]
    assert result.group_scales == scales
    assert sorted(set(scales)) == [0.25, 0.5, 10.0]
    for step_rates, base in zip(seen, result.lrs, strict=False):
        assert step_rates == pytest.approx([base * s for s in scales])


def test_bad_ranges_are_config_errors(tiny_cnn):
    model, x = tiny_cnn
    with pytest.raises(ConfigError, match="0 < start_lr < end_lr"):
        lr_find(model, [(x, torch.zeros(4, dtype=torch.long))], start_lr=1.0, end_lr=1e-3)
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable tensors"):
        lr_find(model, [(x, torch.zeros(4, dtype=torch.long))])
