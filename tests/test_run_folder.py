"""The run folder: never written over, verified when read, code in it never imported, resume changes checked."""

import json

import pytest
import torch

from frostline import run_folder
from frostline.checkpoint import WeightFileError
from frostline.config import DataConfig, FitConfig, ModelConfig, RunConfig, StageConfig
from frostline.errors import ConfigError
from frostline.train.trainer import SilentReporter, Trainer


def _config(output, stages=None, **data):
    stages = stages or [
        StageConfig(name="head", freeze="head", epochs=1, lr=1e-2),
        StageConfig(name="last1", freeze="last:1", epochs=2, lr=1e-3),
    ]
    data = {"ref": "py:tiny_task:data", "batch_size": 64, **data}
    run = RunConfig(output=str(output), patience=5, precision="fp32")
    return FitConfig(ModelConfig("py:tiny_task:model"), DataConfig(**data), stages, run)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_folder_of_other_files_is_refused_listed_and_left_as_it_was(tmp_path):
    own = tmp_path / "mine"
    own.mkdir()
    for name in ("config.json", "head.json", "report.png", "best.safetensors"):
        (own / name).write_text(f"the user's own {name}")
    before = _snapshot(own)
    with pytest.raises(
        ConfigError,
        match=r"not a frostline run: it holds best.safetensors, config.json, head.json, "
        r"report.png; .*--overwrite",
    ):
        Trainer(_config(own)).fit()
    assert _snapshot(own) == before

    Trainer(_config(own, stages=[StageConfig(epochs=1)])).fit(overwrite=True)
    assert json.loads((own / "run.json").read_text())["format"] == "frostline run"


def test_an_error_before_the_first_checkpoint_leaves_no_folder(tmp_path):
    class Fail(SilentReporter):
        def epoch_start(self, stage, epoch, batches):
            raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError):
        Trainer(_config(tmp_path / "run"), Fail()).fit()
    assert not (tmp_path / "run").exists()


def test_a_start_killed_before_its_first_epoch_is_reused_by_the_same_command(tmp_path):
    folder = tmp_path / "run"
    run_folder.start(folder)
    (folder / "config.json").write_text("{}")
    (folder / "metrics.jsonl").write_text("")
    assert run_folder.is_failed_start(folder)
    assert run_folder.choose_run_dir(_config(folder)) == folder
    Trainer(_config(folder, stages=[StageConfig(epochs=1)])).fit()
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_stage_spec_that_names_nothing_stops_the_run_before_stage_one(tmp_path):
    stages = [StageConfig(name="head", epochs=1), StageConfig(name="deep", freeze="from:features.nosuch", epochs=1)]
    with pytest.raises(ConfigError, match=r"stages.1.freeze \('deep'\) = 'from:features.nosuch': .*names no entry"):
        Trainer(_config(tmp_path / "run", stages=stages)).fit()
    assert not (tmp_path / "run").exists()


def test_weight_files_are_verified_and_a_cut_short_write_is_completed(tmp_path):
    folder = tmp_path / "run"
    run_folder.start(folder)
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    run_folder.save_weights(folder, "best.safetensors", tensors, {"epoch": "1"})
    read, note = run_folder.read_weights(folder, "best.safetensors")
    assert torch.equal(read["w"], tensors["w"]) and note is None

    # killed between recording the new file's SHA-256 and renaming it into place
    newer = {"w": torch.ones(2, 3)}
    from frostline.checkpoint import sha256, tensor_bytes, write_durably

    data = tensor_bytes(newer, {"epoch": "2"})
    write_durably(folder / ".best.safetensors.pending", data)
    record = run_folder.read_record(folder)
    record["weights"]["best.safetensors"] = sha256(data)
    run_folder.write_record(folder, record)
    read, _ = run_folder.read_weights(folder, "best.safetensors")
    assert torch.equal(read["w"], newer["w"]) and not (folder / ".best.safetensors.pending").exists()

    # same length, other bytes: refused by name
    raw = bytearray((folder / "best.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (folder / "best.safetensors").write_bytes(bytes(raw))
    with pytest.raises(WeightFileError, match=r"best.safetensors has changed since frostline wrote it"):
        run_folder.read_weights(folder, "best.safetensors")


def test_a_pickle_in_place_of_weights_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "run"
    run_folder.start(folder)
    torch.save({"w": Payload()}, folder / "best.safetensors")
    record = run_folder.read_record(folder)
    from frostline.checkpoint import sha256

    record["weights"]["best.safetensors"] = sha256((folder / "best.safetensors").read_bytes())
    run_folder.write_record(folder, record)
    with pytest.raises(WeightFileError, match=r"best.safetensors is not a safetensors file frostline can read"):
        run_folder.read_weights(folder, "best.safetensors")
    assert not marker.exists()


def test_code_named_by_a_run_folder_is_imported_only_with_trust(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    config = _config(folder).to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError,
        match=r"names code to run \(model.ref = py:tiny_task:model; data.ref = "
        r"py:tiny_task:data\).*--trust-code",
    ):
        run_folder.read_run_config(folder, trust_code=False)
    assert run_folder.read_run_config(folder, trust_code=True).model.ref == "py:tiny_task:model"


def test_resume_applies_changes_to_stages_not_begun_and_refuses_the_rest(tmp_path):
    class StopAfterFirst(SilentReporter):
        def epoch_end(self, record, diagnosis):
            raise KeyboardInterrupt

    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(folder), StopAfterFirst()).fit()

    changed = _config(folder, batch_size=32)
    with pytest.raises(ConfigError) as caught:
        Trainer(changed).fit(resume=folder)
    assert "  data.batch_size: 64 -> 32" in caught.value.problems

    more = _config(folder)
    more.stages[1].epochs = 3
    result = Trainer(more).fit(resume=folder)
    assert [r.stage for r in result.history] == ["head", "last1", "last1", "last1"]
    resumed = json.loads((folder / "run.json").read_text())["resumed"]
    assert resumed == [{"at": "stage 2, epoch 1", "changes": [["stages.1.epochs", 2, 3]]}]
    assert json.loads((folder / "config.json").read_text())["stages"][1]["epochs"] == 3


def test_the_stage_in_progress_can_be_given_more_epochs_on_resume(tmp_path):
    class StopAfterSecond(SilentReporter):
        def epoch_end(self, record, diagnosis):
            if record.epoch == 2:
                raise KeyboardInterrupt

    longer = _config(tmp_path / "straight")
    longer.stages[1].epochs = 3
    straight = Trainer(longer).fit()

    folder = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(folder), StopAfterSecond()).fit()
    more = _config(folder)
    more.stages[1].epochs = 3
    resumed = Trainer(more).fit(resume=folder)

    assert [r.stage for r in resumed.history] == ["head", "last1", "last1", "last1"]
    # the rebuilt schedule continues at the step reached: the rates of the epochs after the resume are those of a
    # run planned with 3 epochs from the start
    for name, rates in straight.history[3].lr_trace.items():
        assert resumed.history[3].lr_trace[name] == pytest.approx(rates, rel=1e-9)
    assert json.loads((folder / "run.json").read_text())["resumed"][0]["changes"] == [["stages.1.epochs", 2, 3]]
    with pytest.raises(ConfigError, match=r"stages.1.epochs: 3 -> 1"):
        fewer = _config(folder)
        fewer.stages[1].epochs = 1
        Trainer(fewer).fit(resume=folder)
