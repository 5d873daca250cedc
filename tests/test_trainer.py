import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_task
from frostline.config import DataConfig, FitConfig, ModelConfig, RunConfig, StageConfig
from frostline.errors import FrostlineError
from frostline.train.monitor import Diagnosis, OverfitMonitor
from frostline.train.runtime import seed_everything
from frostline.train.trainer import SilentReporter, Trainer


def _config(tmp_path, stages=None, model="py:tiny_task:model", data="py:tiny_task:data", **run):
    stages = stages or [
        StageConfig(name="head", freeze="head", epochs=2, lr=1e-2),
        StageConfig(name="last1", freeze="last:1", epochs=2, lr=1e-3, head_lr_mult=3, layer_decay=0.5, warmup=0.2),
    ]
    run = {"output": str(tmp_path / "run"), "patience": 5, "precision": "fp32", **run}
    return FitConfig(ModelConfig(model), DataConfig(ref=data, batch_size=64), stages, RunConfig(**run))


def test_stages_change_what_trains_and_frozen_tensors_never_move(tmp_path):
    seed_everything(0)
    initial, _ = tiny_task.model(10)
    trainer = Trainer(_config(tmp_path))
    result = trainer.fit()

    assert result.stage_plans["head"]["trainable_tensors"] == 2
    assert result.stage_plans["last1"]["trainable_tensors"] == 4
    assert [r.trainable_params for r in result.history] == [490, 490, 490 + 48 * 48 + 48, 490 + 48 * 48 + 48]
    final = trainer.model
    # features.0 was frozen in every stage: bit-identical to its initialisation
    assert torch.equal(final.features[0].weight, initial.features[0].weight)
    assert torch.equal(final.features[0].bias, initial.features[0].bias)
    assert not torch.equal(final.features[3].weight, initial.features[3].weight)
    assert not torch.equal(final.classifier.weight, initial.classifier.weight)
    assert result.best_val_accuracy > 0.4  # 10 classes: it learned
    assert result.stop_reason == "every stage done (head: all 2 epochs; last1: all 2 epochs)"


def test_optimizer_and_schedule_are_rebuilt_per_stage(tmp_path):
    result = Trainer(_config(tmp_path)).fit()
    first, second = result.history[0].lr, result.history[2].lr

    assert set(first) == {"classifier"}
    assert set(second) == {"features.3", "classifier"}
    # stage 2 starts a fresh warm-up at its own rates, keeping the 3x head / 0.5 block ratio
    trace = result.history[2].lr_trace
    assert trace["classifier"][0] < trace["classifier"][-1] or trace["classifier"][0] < 3e-3
    assert trace["classifier"][0] / trace["features.3"][0] == pytest.approx(6.0)


def test_run_folder_holds_config_metrics_best_weights_and_labels(tmp_path):
    trainer = Trainer(_config(tmp_path))
    result = trainer.fit()
    folder = tmp_path / "run"

    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "trainable_tensors", "train_seconds"} <= set(lines[0])
    # the validation set's noise is recorded with every epoch; each example's results stay out of metrics.jsonl
    assert all(r["val_count"] == len(trainer.data.val_labels) and r["val_loss_sd"] > 0 for r in lines)
    assert "examples" not in lines[0]
    assert trainer.history[-1].examples.losses.double().mean().item() == pytest.approx(lines[-1]["val_loss"])
    assert json.loads((folder / "head.json").read_text())["labels"] == [str(i) for i in range(10)]
    assert json.loads((folder / "config.json").read_text())["model"]["ref"] == "py:tiny_task:model"
    best = load_file(str(folder / "best.safetensors"))
    assert all(torch.equal(best[k], v) for k, v in trainer.model.state_dict().items())
    assert result.best_epoch == max(lines, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["epoch"]


class _KillAfter(SilentReporter):
    def __init__(self, epoch):
        self.epoch = epoch

    def epoch_end(self, record, diagnosis):
        if record.epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("kill_after", [1, 2, 3])
def test_resume_after_a_kill_reaches_the_same_final_weights(tmp_path, kill_after):
    straight = Trainer(_config(tmp_path / "a"))
    straight.fit()

    config = _config(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, _KillAfter(kill_after)).fit()
    resumed = Trainer(config)
    resumed.fit(resume=tmp_path / "b" / "run")

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    best_a = load_file(str(tmp_path / "a" / "run" / "best.safetensors"))
    best_b = load_file(str(tmp_path / "b" / "run" / "best.safetensors"))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert [r.val_loss for r in straight.history] == [r.val_loss for r in resumed.history]
    # the monitor's per-example evidence of the epochs before the kill came back with the checkpoint
    for a_record, b_record in zip(straight.history, resumed.history, strict=True):
        assert torch.equal(a_record.examples.losses, b_record.examples.losses)
        assert torch.equal(a_record.examples.correct, b_record.examples.correct)
    assert [r.verdict for r in straight.history] == [r.verdict for r in resumed.history]
    assert len((tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()) == 4
    assert [r.freeze for r in resumed.history] == ["head", "head", "last:1", "last:1"]


def test_overfitting_is_named_stops_the_run_and_keeps_the_best_weights(tmp_path):
    stages = [StageConfig(name="all", freeze="none", epochs=40, lr=3e-3, weight_decay=0.0, schedule="constant")]
    config = _config(
        tmp_path, stages=stages, model="py:tiny_task:wide_model", data="py:tiny_task:small_data", patience=3
    )
    trainer = Trainer(config)
    result = trainer.fit()

    assert result.diagnosis.verdict == "overfitting"
    assert result.stop_reason.startswith(f"overfitting began at epoch {result.overfit_began}")
    assert len(result.history) < 40
    assert result.overfit_began <= len(result.history)
    assert result.best_epoch < len(result.history)
    last = result.history[-1]
    assert last.train_loss < result.history[result.best_epoch - 1].train_loss
    # the model now holds the best epoch's weights, not the last epoch's
    from frostline.train.loop import evaluate, model_forward

    data = trainer.data
    evaluation = evaluate(model_forward(trainer.model), data.val_batches(512), trainer.runtime, [trainer.model])
    assert evaluation.accuracy == pytest.approx(result.best_val_accuracy)
    assert evaluation.loss == pytest.approx(result.best_val_loss, rel=1e-5)


def test_a_non_finite_loss_stops_with_the_step_and_keeps_what_was_written(tmp_path):
    stages = [
        StageConfig(name="head", freeze="head", epochs=1, lr=1e-2),
        StageConfig(name="boom", freeze="none", epochs=2, lr=1e30, schedule="constant"),
    ]
    config = _config(tmp_path, stages=stages, clip_grad=None)
    with pytest.raises(FrostlineError, match=r"stage 'boom', epoch 2: the training loss became (nan|inf) at step \d+"):
        Trainer(config).fit()

    folder = tmp_path / "run"
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1
    assert (folder / "best.safetensors").is_file()
    assert (folder / "checkpoint" / "state.json").is_file()


def test_an_existing_output_folder_is_never_overwritten(tmp_path):
    Trainer(_config(tmp_path, stages=[StageConfig(epochs=1)])).fit()
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(FrostlineError, match="already holds a run; resume it with --resume"):
        Trainer(_config(tmp_path, stages=[StageConfig(epochs=1)])).fit()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    stages = [StageConfig(name="head", freeze="head", epochs=1, lr=1e-2, schedule="constant")]
    big = _config(tmp_path / "a", stages=stages, clip_grad=None)
    small = _config(tmp_path / "b", stages=stages, clip_grad=None, grad_accum=2)
    big.data.batch_size, small.data.batch_size = 40, 20  # 1,200 examples: whole batches only
    one, two = Trainer(big), Trainer(small)
    one.fit()
    two.fit()

    assert one.history[0].steps == two.history[0].steps == 30
    torch.testing.assert_close(one.model.classifier.weight, two.model.classifier.weight, rtol=1e-5, atol=1e-6)


def test_runtime_selection_says_why():
    from frostline.train.runtime import select_runtime

    auto = select_runtime("cpu", "auto")
    assert auto.device.type == "cpu" and auto.precision in ("bf16", "fp32") and auto.reason
    assert select_runtime("cpu", "fp32").reason == "precision fp32 as configured"


def test_a_busy_machine_is_named_with_the_thread_count_that_fits():
    from frostline.train.runtime import contention_note

    assert contention_note(None, threads=2, cores=2) is None  # not measurable (no /proc/stat)
    assert contention_note(0.1, threads=2, cores=2) is None
    assert contention_note(1.0, threads=1, cores=2) is None  # one free core, one thread
    note = contention_note(1.0, threads=2, cores=2)
    assert "other processes use 1.0 of its 2 cores" in note and "run.threads=1" in note
    assert "run.threads=6" in contention_note(2.0, threads=8, cores=8)


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads /proc/stat")
def test_other_processes_cpu_use_is_measured():
    from frostline.train.runtime import other_cpu_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert other_cpu_cores(0.5) >= 0.6  # a spinning process takes most of a core
    finally:
        spinner.kill()
        spinner.wait()


class _HeadOverfitsAtEpoch2(OverfitMonitor):
    def diagnose(self, history, since=0):
        if len(history) == 2:
            return Diagnosis("overfitting", best_epoch=1, epochs_since_best=1, began_epoch=2, message="overfitting: x")
        return super().diagnose(history, since)


def test_overfitting_of_the_head_alone_ends_its_stage_and_the_next_stage_adapts_the_features(tmp_path):
    stages = [
        StageConfig(name="head", freeze="head", epochs=3, lr=1e-2),
        StageConfig(name="last1", freeze="last:1", epochs=2, lr=1e-3),
    ]
    trainer = Trainer(_config(tmp_path, stages=stages))
    trainer.recipe.monitor = _HeadOverfitsAtEpoch2(patience=5)
    seen = []
    trainer.reporter.epoch_end = lambda record, diagnosis: seen.append(diagnosis)
    result = trainer.fit()

    assert [r.stage for r in result.history] == ["head", "head", "last1", "last1"]
    assert result.stop_reason == "every stage done (head: overfitting after 2 of 3 epochs; last1: all 2 epochs)"
    assert "stage 'last1' (last:1) adapts them next" in seen[1].message and seen[1].advice == []


def test_overfitting_of_the_head_in_the_last_stage_stops_the_run(tmp_path):
    stages = [StageConfig(name="head", freeze="head", epochs=3, lr=1e-2)]
    trainer = Trainer(_config(tmp_path, stages=stages))
    trainer.recipe.monitor = _HeadOverfitsAtEpoch2(patience=5)
    result = trainer.fit()

    assert len(result.history) == 2
    assert result.stop_reason == "overfitting began at epoch 2 (stage head); stopped at epoch 2"


def test_auto_precision_is_timed_on_the_model_recorded_in_run_json_and_kept_on_resume(tmp_path, monkeypatch):
    from frostline.train import precision as precision_module
    from frostline.train import trainer as trainer_module
    from frostline.train.precision import Timing

    monkeypatch.setenv("FROSTLINE_CACHE_DIR", str(tmp_path / "cache"))  # these made-up timings stay in this test
    monkeypatch.setattr(precision_module, "time_passes", lambda *a: Timing(0.30, 0.25, 3, 8, "2026-11-29T00:00:00"))
    monkeypatch.setattr(trainer_module, "other_cpu_cores", lambda **kw: None)  # an idle machine: timing counts
    config = _config(tmp_path, precision="auto")
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, _KillAfter(1)).fit()
    record = json.loads((tmp_path / "run" / "run.json").read_text())["runtime"]
    assert record["precision"] == "bf16"  # 0.30 / 0.25 = 1.2x, past the 1.1x bar
    assert "0.300 s in fp32 and 0.250 s in bf16" in record["reason"]

    # timings that now say fp32 do not change a run that started in bf16
    monkeypatch.setattr(precision_module, "time_passes", lambda *a: Timing(0.2, 0.4, 3, 8, "2026-11-29T00:00:00"))
    resumed = Trainer(config)
    resumed.fit(resume=tmp_path / "run")
    assert resumed.runtime.precision == "bf16"
    assert resumed.runtime.reason == "bf16, as chosen when the run started"
