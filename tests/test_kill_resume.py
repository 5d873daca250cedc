"""`kill -9` at the worst moments, then --resume: the same weights and metrics as a run never interrupted.

The run is a real process killed with SIGKILL (no handler, no cleanup): during an epoch, while a checkpoint is
half-written, between the two renames that swap a checkpoint in, and between recording the best weights' SHA-256
and renaming them into place.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frostline.config import DataConfig, FitConfig, ModelConfig, RunConfig, StageConfig
from frostline.train.trainer import Trainer

TESTS = Path(__file__).parent

DRIVER = """
import os, pathlib, signal, sys
sys.path.insert(0, {tests!r})
import frostline.checkpoint as checkpoint
from test_kill_resume import config
from frostline.train.trainer import SilentReporter, Trainer

mode, when = sys.argv[1], int(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
calls = {{"n": 0}}

def counted():
    calls["n"] += 1
    return calls["n"] == when

class Reporter(SilentReporter):
    epoch = 0
    def epoch_start(self, stage, epoch, batches):
        self.epoch = epoch
    def step(self, done, total, loss):
        if mode == "epoch" and self.epoch == when and done == 3:
            die()

if mode == "checkpoint":
    write = checkpoint.atomic_write_text
    def atomic_write_text(path, text):
        if path.name == "state.json" and counted():
            die()
        write(path, text)
    checkpoint.atomic_write_text = atomic_write_text
if mode in ("swap", "best"):
    rename, replace = pathlib.Path.rename, pathlib.Path.replace
    def renamed(self, target):
        result = rename(self, target)
        if mode == "swap" and pathlib.Path(target).name == "checkpoint.old" and counted():
            die()
        return result
    def replaced(self, target):
        if mode == "best" and self.name == ".best.safetensors.pending" and counted():
            die()
        return replace(self, target)
    pathlib.Path.rename, pathlib.Path.replace = renamed, replaced

Trainer(config(sys.argv[3]), Reporter()).fit()
"""


def config(output: str) -> FitConfig:
    stages = [
        StageConfig(name="head", freeze="head", epochs=2, lr=1e-2),
        StageConfig(name="last1", freeze="last:1", epochs=2, lr=1e-3, head_lr_mult=3, layer_decay=0.5, warmup=0.2),
    ]
    run = RunConfig(output=output, patience=5, precision="fp32")
    return FitConfig(ModelConfig("py:tiny_task:model"), DataConfig(ref="py:tiny_task:data", batch_size=64), stages, run)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight") / "run"
    trainer = Trainer(config(str(folder)))
    trainer.fit()
    return folder, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _metrics(folder: Path) -> list[tuple]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["stage"], r["train_loss"], r["val_loss"], r["val_accuracy"], r["best"]) for r in records]


@pytest.mark.parametrize(
    ("mode", "when"),
    [
        ("epoch", 1),  # mid-epoch, before any checkpoint: the start is cleared and the run is started again
        ("epoch", 3),  # mid-epoch in the second stage
        ("checkpoint", 2),  # checkpoint.new half-written (tensors, no state.json)
        ("swap", 2),  # the old checkpoint moved aside, the new one not yet in place
        ("best", 2),  # best weights recorded in run.json, not yet renamed into place
    ],
)
def test_sigkill_then_resume_gives_the_uninterrupted_weights_and_metrics(tmp_path, straight, mode, when):
    folder = tmp_path / "run"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(TESTS)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, str(script), mode, str(when), str(folder)], env=env, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL

    trainer = Trainer(config(str(folder)))
    if (folder / "checkpoint").is_dir() or (folder / "checkpoint.old").is_dir():
        trainer.fit(resume=folder)
    else:
        # killed before the first checkpoint: the folder is a failed start that the same command reuses
        trainer.fit()

    straight_folder, straight_state = straight
    assert _metrics(folder) == _metrics(straight_folder)
    final = trainer.model.state_dict()
    assert all(torch.equal(final[k], straight_state[k]) for k in straight_state)
    best, expected = load_file(str(folder / "best.safetensors")), load_file(str(straight_folder / "best.safetensors"))
    assert best.keys() == expected.keys() and all(torch.equal(best[k], expected[k]) for k in expected)
    assert not (folder / ".best.safetensors.pending").exists() and not (folder / "checkpoint.new").exists()
