"""The Lightning and Hugging Face integrations under their frameworks' own DistributedDataParallel (gloo, 2 processes).

Each test starts 2 real processes (torch.multiprocessing.spawn) with the environment torchrun gives its workers, so
Lightning's DDPStrategy and accelerate join the process group themselves, and compares them with one process that
trains with the global batch: DDP must sync exactly the tensors each stage trains.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import tiny_task
from frostline.config import StageConfig

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with gloo",
)

BATCH = 16
"""Per process; the single process trains with 2 x BATCH."""

# rates for SGD with momentum (see TOLERANCE)
STAGES = [
    StageConfig(name="head", freeze="head", epochs=2, lr=0.1),
    # unfreezes tensors the head stage kept frozen: a DDP wrapper built before the freeze would not sync them
    StageConfig(name="last2", freeze="last:2", epochs=2, lr=0.05, head_lr_mult=2, layer_decay=0.8),
    # the spare block trains by name but never runs: DDP must leave it out, not wait for its gradient
    StageConfig(name="blocks", freeze="train=blocks.*,spare,head", epochs=2, lr=0.02),
]

# Tolerance: the processes' gradients are the same sums in another order (two shard means, averaged by DDP's
# all-reduce, against one mean over the global batch), so the runs differ by float32 rounding, carried through the
# epochs by SGD, whose steps are linear in the gradient. (AdamW divides each step by the gradient's own size: an
# element whose gradient is near zero moves by a whole step when rounding flips its sign. Measured with AdamW: 2e-7
# to 2.3e-5 apart, by chance.) Measured with SGD: at most 4.9e-8 apart in either framework, where every trained
# tensor moved by 1e-2 or more; atol 1e-6 leaves 20x of margin, and a tensor trained out of sync would be off by a
# share of its movement.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def _sgd(groups):
    return torch.optim.SGD(groups, momentum=0.9)


def _data():
    made = tiny_task.data()
    (tx, ty), (vx, vy) = made["train"], made["val"]
    # 992 training examples, 31 global batches of 32: every step's shards are equal halves of the global batch
    # (accelerate repeats examples to even out a last batch the processes cannot share equally, and DDP's mean of
    # unequal shards' means is not the global batch's mean); 360 validation examples
    return (tx[:992], ty[:992]), (vx[:360], vy[:360])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_environment(rank, world, port):
    """What torchrun sets for each worker (Lightning reads it as TorchElastic's)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_RUN_ID="frostline-test",
    )
    torch.set_num_threads(1)


def _spawn(worker, folder):
    mp.spawn(worker, args=(2, _free_port(), folder), nprocs=2, join=True)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_against_one_process(ranks, one, prefix=""):
    """Replicas identical, equal to one process with the global batch, frozen tensors bit-identical everywhere."""
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    assert ranks[0]["history"] == ranks[1]["history"]
    original = _params(tiny_task.blocks_net())
    moved = max(float((one[prefix + n] - t).abs().max()) for n, t in original.items())
    apart = max(float((ranks[0]["state"][n] - t).abs().max()) for n, t in one.items())
    for name, tensor in one.items():
        torch.testing.assert_close(
            ranks[0]["state"][name], tensor, **TOLERANCE, msg=f"{name}: {apart:.1e} apart, moved {moved:.2f}"
        )
    # frozen in every stage: the stem; trainable but never run: the spare block; bit-identical on every rank
    for rank in ranks:
        for name in ("stem.weight", "stem.bias", "spare.weight", "spare.bias"):
            assert torch.equal(rank["state"][prefix + name], original[name]), name
    # trained only from stage 2 on, after the head stage's wrapper: synced, and moved
    assert not torch.equal(ranks[0]["state"][prefix + "blocks.2.0.weight"], original["blocks.2.0.weight"])


# ---- Lightning ------------------------------------------------------------------------------------------------------


def _lightning_fit(
    devices, batch, strategy="auto", net=tiny_task.blocks_net, stages=STAGES, everywhere=True, checkpoints=None
):
    import lightning.pytorch as L
    from torch.utils.data import TensorDataset

    from frostline.integrations.lightning import FrostlineRecipe

    (tx, ty), (vx, vy) = _data()

    class Digits(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()
            self.example_input_array = torch.zeros(2, 64)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            # logged without sync_dist: the recipe averages the processes' values itself
            x, y = batch
            logits = self.net(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            if everywhere or self.global_rank == 0:
                self.log("val_acc", (logits.argmax(-1) == y).float().mean(), rank_zero_only=not everywhere)
            recipe.record_validation(logits, y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return _loader(TensorDataset(tx, ty), batch)

        def val_dataloader(self):
            return _loader(TensorDataset(vx, vy), 60)

    recipe = FrostlineRecipe(stages, model="net", patience=9, restore_best=False, optimizer=_sgd)
    module = Digits()
    trainer = L.Trainer(
        max_epochs=recipe.epochs,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=checkpoints is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recipe] + ([_mid_epoch_checkpoint(checkpoints)] if checkpoints is not None else []),
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    history = [(r.stage, r.train_loss, r.val_loss, r.val_accuracy, r.val_count) for r in recipe.history]
    return _params(module), history


def _mid_epoch_checkpoint(folder):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # the 10th step of the first epoch (of 31)
    return ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=10, save_top_k=-1)


def _loader(dataset, batch):
    """Examples in order; with several processes each takes every other one (Lightning's own sampler would shuffle
    the training set, and one process with the global batch could not see the same batches)."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    several = torch.distributed.is_initialized()
    return DataLoader(
        dataset, batch_size=batch, sampler=DistributedSampler(dataset, shuffle=False) if several else None
    )


def _lightning_worker(rank, world, port, folder):
    _torchrun_environment(rank, world, port)
    state, history = _lightning_fit(world, BATCH, strategy="ddp", checkpoints=folder / "checkpoints")
    torch.save({"state": state, "history": history}, folder / f"lightning{rank}.pt")


def test_lightning_ddp_wraps_each_stage_and_trains_the_weights_of_one_process_with_the_global_batch(tmp_path):
    pytest.importorskip("lightning", reason="the lightning extra is not installed (pip install 'frostline[lightning]')")
    _spawn(_lightning_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"lightning{r}.pt") for r in (0, 1)]
    one, history = _lightning_fit(1, 2 * BATCH)
    _check_against_one_process(ranks, one, prefix="net.")
    # every process judged the whole validation set: the examples gathered, the losses averaged
    assert [r[0] for r in ranks[0]["history"]] == ["head"] * 2 + ["last2"] * 2 + ["blocks"] * 2
    assert all(r[4] == 360 for r in ranks[0]["history"])
    for two, single in zip(ranks[0]["history"], history, strict=True):
        assert two[1:4] == pytest.approx(single[1:4], rel=1e-4)
    # a checkpoint taken in the middle of an epoch (written by rank 0) holds the epoch's tally of both processes
    saved = torch.load(tmp_path / "checkpoints" / "step=10.ckpt", weights_only=False)
    tally = next(state for key, state in saved["callbacks"].items() if "FrostlineRecipe" in key)["epoch_tally"]
    assert tally["seen"] == 10 * 2 * BATCH and tally["step"] == 0


def _lightning_refusal_worker(rank, world, port, folder):
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from frostline.errors import FrostlineError

    _torchrun_environment(rank, world, port)
    cases = {
        "aux": lambda ddp: _lightning_fit(
            world, BATCH, ddp, net=lambda: tiny_task.blocks_net(aux=True), stages=[StageConfig("all", "none", epochs=1)]
        ),
        "rank0-metric": lambda ddp: _lightning_fit(world, BATCH, ddp, everywhere=False),
    }
    for case, fit in cases.items():
        try:
            # a process left waiting in a collective fails within a minute (the default is half an hour)
            fit(DDPStrategy(timeout=timedelta(seconds=60)))
        except FrostlineError as err:
            (folder / f"{case}{rank}.txt").write_text(str(err))


def test_lightning_ddp_stops_every_process_with_the_reason(tmp_path):
    pytest.importorskip("lightning", reason="the lightning extra is not installed (pip install 'frostline[lightning]')")
    # both cases in the same two processes, one after the other
    mp.spawn(_lightning_refusal_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    expected = {
        # a branch that runs only in training: left out of DDP by the map, it would train out of sync
        "aux": (["net.aux.weight", "got gradients in training"], ["net.aux.weight", "find_unused_parameters=True"]),
        # a metric logged by rank 0 alone: rank 1 names it, rank 0 stops too instead of waiting in a collective
        "rank0-metric": (["another process did not log"], ["val_accuracy", "which was not logged"]),
    }
    for case, per_rank in expected.items():
        for rank, parts in enumerate(per_rank):
            said = (tmp_path / f"{case}{rank}.txt").read_text()
            assert all(part in said for part in parts), (case, rank, said)


def test_lightning_ddp_spawn_is_refused_with_the_reason():
    pytest.importorskip("lightning", reason="the lightning extra is not installed (pip install 'frostline[lightning]')")
    import lightning.pytorch as L
    from lightning.pytorch.strategies import DDPStrategy

    from frostline.errors import ConfigError
    from frostline.integrations.lightning import _check_trainer

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="spawn"), logger=False)
    with pytest.raises(ConfigError, match="hand back only the weights"):
        _check_trainer(trainer, L.LightningModule())


# ---- transformers ---------------------------------------------------------------------------------------------------


class _Classifier(tiny_task.BlocksNet):
    """tiny_task.BlocksNet with the Trainer's interface: keyword inputs, a loss when labels come."""

    def forward(self, x, labels=None):
        logits = super().forward(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits} if labels is not None else {"logits": logits}


class _Examples(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _transformers_fit(folder, batch, **more):
    from transformers import Trainer, TrainingArguments

    from frostline.integrations.transformers import FrostlineCallback

    (tx, ty), (vx, vy) = _data()
    torch.manual_seed(0)
    model = _Classifier()
    callback = FrostlineCallback(STAGES, example_batch={"x": torch.zeros(2, 64)}, patience=9, optimizer=_sgd)
    args = TrainingArguments(
        output_dir=str(folder),
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=60,
        num_train_epochs=callback.epochs,
        disable_tqdm=True,
        **more,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Examples(tx, ty),
        eval_dataset=_Examples(vx, vy),
        compute_metrics=callback.compute_metrics,
        callbacks=[callback],
        optimizers=callback.optimizers(),
    )
    trainer.train()
    history = [(r.stage, r.train_loss, r.val_loss, r.val_accuracy, r.val_count) for r in callback.history]
    return _params(model), history, callback


def _transformers_worker(rank, world, port, folder):
    _torchrun_environment(rank, world, port)
    import transformers

    from frostline.errors import ConfigError

    state, history, callback = _transformers_fit(folder / f"out{rank}", BATCH)
    torch.save({"state": state, "history": history}, folder / f"transformers{rank}.pt")

    # then, in the same processes, a run whose blocks the user froze before training: DDP will not sync them, and a
    # stage trains them
    original = transformers.Trainer.train

    def train_with_blocks_frozen(self, *args, **kwargs):
        for param in self.model.blocks.parameters():
            param.requires_grad_(False)
        return original(self, *args, **kwargs)

    transformers.Trainer.train = train_with_blocks_frozen
    try:
        _transformers_fit(folder / f"again{rank}", BATCH)
    except ConfigError as err:
        (folder / f"refused{rank}.txt").write_text(str(err))


def test_transformers_ddp_syncs_every_stage_and_refuses_tensors_ddp_does_not_sync(tmp_path):
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    _spawn(_transformers_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"transformers{r}.pt") for r in (0, 1)]
    one, history, _ = _transformers_fit(tmp_path / "one", 2 * BATCH)
    _check_against_one_process(ranks, one)
    assert [r[0] for r in ranks[0]["history"]] == ["head"] * 2 + ["last2"] * 2 + ["blocks"] * 2
    assert all(r[4] == 360 for r in ranks[0]["history"])
    for two, single in zip(ranks[0]["history"], history, strict=True):
        assert two[1:4] == pytest.approx(single[1:4], rel=1e-4)
    # blocks frozen before trainer.train(), trained by a stage: refused in both processes, by name
    for rank in (0, 1):
        message = (tmp_path / f"refused{rank}.txt").read_text()
        assert "blocks.0.0.weight" in message and "did not require grad" in message


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ddp_find_unused_parameters": False}, "ddp_find_unused_parameters=False"),
        ({"activation_checkpointing": True}, "with activation checkpointing"),
        ({"ddp_static_graph": True}, "ddp_static_graph=True"),
        ({"fsdp": "full_shard"}, "fsdp: the callback runs under DistributedDataParallel only"),
        ({"n_gpu": 2}, "n_gpu=2 (DataParallel)"),
    ],
)
def test_transformers_ddp_settings_the_recipe_cannot_run_under_are_refused(change, message):
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    from types import SimpleNamespace

    from frostline.errors import ConfigError
    from frostline.integrations.transformers import FrostlineCallback

    callback = FrostlineCallback(STAGES)
    args = {
        "eval_strategy": "epoch",
        "eval_delay": 0,
        "max_steps": -1,
        "num_train_epochs": callback.epochs,
        "n_gpu": 0,
        "world_size": 2,
        "ddp_find_unused_parameters": None,
        "ddp_static_graph": None,
        "activation_checkpointing": False,
    }
    callback._check_args(SimpleNamespace(**args))  # two processes with the Trainer's defaults: accepted
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        callback._check_args(SimpleNamespace(**{**args, **change}))
