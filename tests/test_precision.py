import json

import pytest
import torch
from torch import nn

from frostline.train import precision as precision_module
from frostline.train.loop import model_forward
from frostline.train.precision import Timing, choose_precision, machine_key, time_passes
from frostline.train.runtime import Runtime


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 3))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FROSTLINE_CACHE_DIR", str(tmp_path))
    return tmp_path / "precision.json"


def test_timing_leaves_weights_buffers_gradients_mode_and_random_stream_as_they_were():
    model = _model().train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.randn(8, 16)
    state = torch.get_rng_state()

    timing = time_passes(model_forward(model), model, batch, torch.device("cpu"))

    assert timing.fp32_seconds > 0 and timing.bf16_seconds > 0 and timing.examples == 8
    assert 1 <= timing.steps <= precision_module.STEPS
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BatchNorm statistics too
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[4].weight.grad is None
    assert model.training
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(("fp32", "bf16", "chosen"), [(1.0, 0.5, "bf16"), (1.0, 0.95, "fp32"), (0.3, 6.0, "fp32")])
def test_a_cached_timing_decides_without_measuring_again(cache, monkeypatch, fp32, bf16, chosen):
    model, batch = _model(), torch.randn(8, 16)
    key = machine_key(model, batch)
    cache.write_text(
        json.dumps(
            {
                key: {
                    "fp32_seconds": fp32,
                    "bf16_seconds": bf16,
                    "steps": 3,
                    "examples": 8,
                    "measured_at": "2026-01-02T03:04:05+00:00",
                }
            }
        )
    )
    monkeypatch.setattr(precision_module, "time_passes", lambda *a: pytest.fail("measured although cached"))

    runtime, record = choose_precision(
        Runtime(torch.device("cpu"), "fp32", "guess", True), model_forward(model), model, batch
    )

    assert runtime.precision == record["precision"] == chosen
    assert f"{fp32:.3f} s in fp32 and {bf16:.3f} s in bf16" in runtime.reason and "cached" in runtime.reason


def test_a_measurement_is_cached_per_machine_and_model_and_a_damaged_cache_is_measured_over(cache, monkeypatch):
    cache.write_text("{not json")
    calls = []

    def fake(forward, model, batch, device):
        calls.append(model)
        return Timing(0.2, 0.1, 3, len(batch), "2026-11-29T00:00:00+00:00")

    monkeypatch.setattr(precision_module, "time_passes", fake)
    runtime = Runtime(torch.device("cpu"), "fp32", "guess", True)
    model = _model()

    first, _ = choose_precision(runtime, model_forward(model), model, torch.randn(8, 16))
    again, _ = choose_precision(runtime, model_forward(model), model, torch.randn(8, 16))
    other = nn.Linear(16, 3)
    choose_precision(runtime, model_forward(other), other, torch.randn(8, 16))

    assert first.precision == again.precision == "bf16" and "measured now" in first.reason and "cached" in again.reason
    assert calls == [model, other]
    assert len(json.loads(cache.read_text())) == 2


def test_a_busy_machine_uses_a_cached_timing_or_keeps_the_first_guess_without_timing(cache, monkeypatch):
    monkeypatch.setattr(precision_module, "time_passes", lambda *a: pytest.fail("timed on a busy machine"))
    model, batch = _model(), torch.randn(8, 16)
    guess = Runtime(torch.device("cpu"), "fp32", "fp32: this CPU has no native bf16", True)

    runtime, record = choose_precision(guess, model_forward(model), model, batch, measure=False)
    assert runtime.precision == record["precision"] == "fp32"
    assert "not timed: other work was using the CPU" in runtime.reason

    key = machine_key(model, batch)
    cache.write_text(
        json.dumps(
            {
                key: {
                    "fp32_seconds": 1.0,
                    "bf16_seconds": 0.5,
                    "steps": 3,
                    "examples": 8,
                    "measured_at": "2026-01-02T03:04:05+00:00",
                }
            }
        )
    )
    runtime, _ = choose_precision(guess, model_forward(model), model, batch, measure=False)
    assert runtime.precision == "bf16" and "cached" in runtime.reason
