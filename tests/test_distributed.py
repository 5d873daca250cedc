"""Two processes under torch.distributed (gloo, CPU) train the same recipe as one process with twice the batch.

Each test starts 2 real processes (torch.multiprocessing.spawn) that join a gloo process group the way torchrun's
environment describes it, and run frostline's Trainer on the digits task.
"""

import os
import socket
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp

import tiny_task
from frostline.config import DataConfig, FitConfig, RunConfig, StageConfig
from frostline.dataset import PreparedData
from frostline.sources import ModelSource
from frostline.train.trainer import Trainer

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with gloo",
)

BATCH = 16
"""Per process; the single process runs with 2 x BATCH."""


def _data():
    made = tiny_task.data()
    (tx, ty), (vx, vy) = made["train"], made["val"]
    # 1,199 training examples: each epoch's last global batch (15 of 32) splits 7 / 8, so the shards' loss weights
    # matter (with equal shards a plain average of their means would pass too)
    return PreparedData(tx[:1199], ty[:1199], vx, vy, made["label_names"], origin="digits")


# rates for SGD with momentum (see TOLERANCE)
STAGES = [
    StageConfig(name="head", freeze="head", epochs=2, lr=0.1),
    StageConfig(name="last2", freeze="last:2", epochs=2, lr=0.05, head_lr_mult=2, layer_decay=0.8),
    # the spare block trains by name but never runs: DDP must leave it out, not wait for its gradient
    StageConfig(name="blocks", freeze="train=blocks.*,spare,head", epochs=2, lr=0.02),
]


def _config(batch, output=None, cache="auto"):
    run = RunConfig(cache=cache, patience=9, precision="fp32", tensorboard=False, output=output)
    return FitConfig(data=DataConfig(batch_size=batch), stages=STAGES, run=run)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Crash(Exception):
    pass


def _worker(rank, world, port, folder, cache, crash_after):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    if crash_after:
        save = Trainer._save
        calls = {"n": 0}

        def crashing(self, *args, **kwargs):
            save(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == crash_after:
                raise _Crash  # in every process at once, after the checkpoint of that epoch

        Trainer._save = crashing
    # rank 1 is given a folder of its own: frostline must not write it (rank 0 writes the run folder)
    output = str(folder / ("run" if rank == 0 else "rank1-run"))
    trainer = Trainer(
        _config(BATCH, output, cache),
        source=ModelSource("py:test", tiny_task.blocks_net(), torch.zeros(2, 64), True),
        data=_data(),
    )
    try:
        with mock.patch("frostline.train.trainer.adamw", _sgd):
            result = trainer.fit()
    except _Crash:
        return
    state = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    accuracies = [r.val_accuracy for r in result.history]
    torch.save({"state": state, "accuracies": accuracies}, folder / f"rank{rank}.pt")


def _aux_worker(rank, world, port, folder):
    from frostline.errors import FrostlineError

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    config = FitConfig(
        data=DataConfig(batch_size=BATCH),
        stages=[StageConfig(name="all", freeze="none", epochs=2, lr=0.1)],
        run=RunConfig(cache="off", precision="fp32", tensorboard=False),
    )
    trainer = Trainer(
        config, source=ModelSource("py:test", tiny_task.blocks_net(aux=True), torch.zeros(2, 64), True), data=_data()
    )
    try:
        trainer.fit(write=False)
    except FrostlineError as err:
        (folder / f"aux{rank}.txt").write_text(str(err))


def test_a_branch_that_runs_only_in_training_stops_every_process_with_its_name(tmp_path):
    # the map (eval mode) never runs the auxiliary head, so DDP leaves it out; it would train out of sync
    mp.spawn(_aux_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        said = (tmp_path / f"aux{rank}.txt").read_text()
        assert "aux.weight" in said and "got gradients in training" in said, said


def _two_processes(folder, cache="auto", crash_after=0):
    mp.spawn(_worker, args=(2, _free_port(), folder, cache, crash_after), nprocs=2, join=True)


def _sgd(groups):
    return torch.optim.SGD(groups, momentum=0.9)


def _one_process(batch, folder=None, cache="auto", resume=None):
    trainer = Trainer(
        _config(batch, str(folder) if folder else None, cache),
        source=ModelSource("py:test", tiny_task.blocks_net(), torch.zeros(2, 64), True),
        data=_data(),
    )
    with mock.patch("frostline.train.trainer.adamw", _sgd):
        result = trainer.fit(resume=resume, write=folder is not None or resume is not None)
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, result


# Tolerance: the processes' gradients are the same sums in another order (each shard's mean, weighted, then DDP's
# all-reduce), so the runs differ by float32 rounding, carried through the epochs by SGD, whose steps are linear in
# the gradient (frostline's AdamW is patched out here: it divides each step by the gradient's own size, so an element
# whose near-zero gradient changes sign by rounding moves a whole step, and the runs were 1.2e-7 apart on one try and
# over 1e-6 on another). Measured with SGD: 3.0e-8 apart (cache on and off), where every trained tensor moved by
# 1.2e-2 or more; atol 1e-6 leaves 30x of margin. With the shards' losses averaged unweighted (the last batch's 7 / 8
# split then counts wrong) the runs are 2.7e-3 apart and the test fails.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_two_processes_with_batch_b_train_the_weights_of_one_with_batch_2b(tmp_path, cache):
    _two_processes(tmp_path, cache)
    one, result = _one_process(2 * BATCH, cache=cache)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # DDP keeps the replicas identical, and every process recorded the same history
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    assert ranks[0]["accuracies"] == ranks[1]["accuracies"]
    assert ranks[0]["accuracies"] == pytest.approx([r.val_accuracy for r in result.history], abs=1e-9)
    for name, tensor in one.items():
        torch.testing.assert_close(ranks[0]["state"][name], tensor, **TOLERANCE, msg=name)
    # frozen in every stage: the stem; trainable but never run: the spare block; on every rank, bit-identical
    original = dict(tiny_task.blocks_net().named_parameters())
    for rank in ranks:
        for name in ("stem.weight", "stem.bias", "spare.weight", "spare.bias"):
            assert torch.equal(rank["state"][name], original[name]), name
    assert not torch.equal(ranks[0]["state"]["blocks.2.0.weight"], original["blocks.2.0.weight"])
    # only rank 0 writes: rank 1's folder was never made
    assert (tmp_path / "run" / "best.safetensors").is_file()
    assert not (tmp_path / "rank1-run").exists()


def test_a_two_process_run_resumes_in_one_process(tmp_path):
    # killed in both processes after the checkpoint of epoch 3 (stage last2, its first epoch)
    _two_processes(tmp_path, crash_after=3)
    assert (tmp_path / "run" / "checkpoint").is_dir() and not (tmp_path / "rank1-run").exists()
    resumed, result = _one_process(2 * BATCH, resume=tmp_path / "run")
    assert [r.epoch for r in result.history] == list(range(1, 7))
    uninterrupted, _ = _one_process(2 * BATCH)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, **TOLERANCE, msg=name)


@pytest.mark.parametrize("class_weight", [None, torch.tensor([0.5, 2.0, 1.0, 3.0])])
@pytest.mark.parametrize("n", [7, 32, 1])
def test_the_shards_weighted_losses_average_to_the_global_batchs_loss(class_weight, n):
    from frostline.batches import TensorBatches
    from frostline.train.distributed import Group, ShardedBatches

    generator = torch.Generator().manual_seed(n)
    logits, labels = torch.randn(n, 4, generator=generator), torch.randint(0, 4, (n,), generator=generator)
    batches = TensorBatches(logits, labels, batch_size=n)

    def loss(x, y):
        return torch.nn.functional.cross_entropy(x, y, weight=class_weight, label_smoothing=0.1)

    shards = [next(iter(ShardedBatches(batches, Group(rank, 3, rank, "gloo"), class_weight))) for rank in range(3)]
    # what DDP computes: the mean over the processes of each one's weighted shard loss
    averaged = sum(weight * loss(x, y) for x, y, weight in shards) / 3
    torch.testing.assert_close(averaged, loss(logits, labels))


def test_nproc_runs_the_same_command_under_torchrun(monkeypatch):
    import subprocess

    from frostline.cli.main import main

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["fit", "x.yaml", "--np", "2", "--set", "run.seed=1"]) == 0
    assert calls[0][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert calls[0][5:] == ["-m", "frostline", "fit", "x.yaml", "--set", "run.seed=1"]
