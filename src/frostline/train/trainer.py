"""The trainer: runs a recipe of stages through the stage engine, holds the run's state, writes the run folder.

What each stage does and what follows each epoch is decided by `frostline.recipe.Recipe` (freeze plan, fresh
parameter groups and schedule, the lint, the guard, the monitor's verdict, best weights, the end of a stage or of
the run); the trainer adds what only it has: the feature cache, checkpoints and exact resume, the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from frostline import run_folder
from frostline.adapters import Adapters, adapt_and_map
from frostline.batches import TensorBatches, batch_to
from frostline.checkpoint import (
    atomic_write_text,
    model_tensors,
    read_checkpoint,
    save_checkpoint,
)
from frostline.config import FitConfig, StageConfig, config_changes, with_resolved_paths
from frostline.dataset import PreparedData, prepare_data
from frostline.errors import ConfigError, FrostlineError
from frostline.freeze import FreezePlan, plan_freeze
from frostline.guard import Finding
from frostline.inspect import ModelMap
from frostline.optim import adamw, group_rates
from frostline.recipe import EpochRecord, Recipe, Stage, steps_per_epoch
from frostline.runs import read_head
from frostline.sources import ModelSource, open_model
from frostline.sources.models import open_preprocess, open_tokenizer
from frostline.sources.sentence import check_windows
from frostline.train import distributed, tensorboard
from frostline.train.cache import Ahead, FeatureCache, fingerprint, plan_cache
from frostline.train.evidence import ValidationExamples, attach_examples, examples_tensors
from frostline.train.loop import EpochResult, EvalResult, NonFiniteLoss, evaluate, model_forward, train_epoch
from frostline.train.loss import training_loss
from frostline.train.monitor import Diagnosis
from frostline.train.precision import choose_precision
from frostline.train.runtime import (
    CpuSample,
    Runtime,
    contention_note,
    is_main_process,
    other_cpu_cores,
    seed_everything,
    select_runtime,
)
from frostline.train.tails import Tail


class Reporter(Protocol):
    """What the trainer tells whoever watches it (the CLI draws progress bars from these)."""

    def note(self, message: str) -> None: ...
    def stage_start(self, index: int, stage: StageConfig, plan: FreezePlan, findings: list[Finding]) -> None: ...
    def epoch_start(self, stage: StageConfig, epoch: int, batches: int) -> None: ...
    def progress_start(self, label: str, total: int) -> None: ...
    def step(self, done: int, total: int, loss: float) -> None: ...
    def epoch_end(self, record: EpochRecord, diagnosis: Diagnosis) -> None: ...


class SilentReporter:
    """A reporter that says nothing (the default for the Python API)."""

    def note(self, message: str) -> None:
        pass

    def stage_start(self, index: int, stage: StageConfig, plan: FreezePlan, findings: list[Finding]) -> None:
        pass

    def epoch_start(self, stage: StageConfig, epoch: int, batches: int) -> None:
        pass

    def progress_start(self, label: str, total: int) -> None:
        pass

    def step(self, done: int, total: int, loss: float) -> None:
        pass

    def epoch_end(self, record: EpochRecord, diagnosis: Diagnosis) -> None:
        pass


@dataclass
class FitResult:
    """What a run produced."""

    history: list[EpochRecord]
    best_epoch: int
    best_stage: str
    best_val_accuracy: float
    best_val_loss: float
    stop_reason: str
    diagnosis: Diagnosis | None
    overfit_began: int | None
    run_dir: Path | None
    seconds: float
    label_names: list[str]
    stage_plans: dict[str, dict[str, Any]] = field(default_factory=dict)


class Trainer:
    """Runs a `FitConfig`: one object holds the state; the loop body is plain functions."""

    def __init__(
        self,
        config: FitConfig,
        reporter: Reporter | None = None,
        source: ModelSource | None = None,
        data: PreparedData | None = None,
    ):
        self.config = config
        # under torchrun: this process's place among the run's processes (None for one process)
        self.group, self._made_group = distributed.join(config.run.device)
        # one process speaks for all: the others would print the same lines
        self.reporter = (reporter or SilentReporter()) if is_main_process() else SilentReporter()
        self.runtime: Runtime = select_runtime(config.run.device, config.run.precision)
        self.runtime_record: dict[str, Any] | None = None
        """How the precision was chosen (measured timings for `precision: auto` on a CPU), kept in run.json."""
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        seed_everything(config.run.seed)
        self.source = source
        self.data = data
        self.history: list[EpochRecord] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self.run_dir: Path | None = None
        self.recipe = Recipe.from_config(config)
        self.stage_plans: dict[str, dict[str, Any]] = {}
        self.cache_dtype = torch.bfloat16 if config.run.cache_dtype == "bf16" else torch.float32
        self.cache: FeatureCache | None = None
        self.tensorboard: tensorboard.TensorBoardLog | None = None
        self.adapters: Adapters | None = None
        """The LoRA adapters added to the model (a recipe with a lora stage), recorded in head.json."""
        self.resized_stage: int | None = None
        """The stage in progress whose number of epochs was changed on resume, if any."""

    # ---- set-up -------------------------------------------------------------------------------
    def _prepare(self, recorded_runtime: dict[str, Any] | None = None) -> None:
        """Read the data, load and map the model, choose the precision (`recorded_runtime`: a resumed run's own)."""
        # the machine's load is sampled across the loading below, so measuring it adds no wait of its own
        load_start = CpuSample.now()
        if self.data is None:
            ref = self.config.model.ref
            tokenizer = self.source.tokenizer if self.source is not None else open_tokenizer(ref)
            preprocess = self.source.preprocess if self.source is not None else open_preprocess(ref)

            def reading(done: int, total: int, loss: float) -> None:
                if done == 1:
                    self.reporter.progress_start(f"reading {self.config.data.ref}", total)
                self.reporter.step(done, total, loss)

            try:
                self.data = prepare_data(
                    self.config.data, tokenizer, self.config.run.seed, preprocess=preprocess, progress=reading
                )
            finally:
                self.reporter.progress_start("", 0)
        if self.source is None:
            self.reporter.note(f"loading {self.config.model.ref}")
            seed_everything(self.config.run.seed)
            self.source = open_model(self.config.model.ref, num_classes=len(self.data.label_names))
        for note in self.source.notes + self.data.notes:
            self.reporter.note(note)
        if self.group is not None and min(len(self.data.train_labels), len(self.data.val_labels)) < self.group.world:
            raise ConfigError(
                f"{self.group.world} processes split the training and validation examples between them, and the data "
                f"has {len(self.data.train_labels)} training and {len(self.data.val_labels)} validation examples; "
                "run fewer processes than either"
            )
        self.reporter.note(self.data.describe())
        self.loss_fn, loss_note = training_loss(
            self.config.run.class_weights,
            self.config.run.label_smoothing,
            self.data.train_labels,
            self.data.label_names,
        )
        if loss_note:
            self.reporter.note(loss_note)
        busy = None
        if self.runtime.device.type == "cpu" and self.group is None:
            busy = contention_note(other_cpu_cores(since=load_start), torch.get_num_threads(), os.cpu_count() or 1)
        check_windows(self.source.model, self.config.data.windows, self.config.model.ref)
        self.model: nn.Module = self.source.model.to(self.runtime.device)
        self.model, batchnorm = distributed.sync_batchnorm(self.model, self.group, self.runtime.device)
        if self.group is not None:
            self.reporter.note(
                f"torch.distributed: {self.group.world} processes ({self.group.backend}), DistributedDataParallel; "
                f"batch {self.config.data.batch_size} per process, {self.config.data.batch_size * self.group.world} "
                "per step" + (f"; {batchnorm}" if batchnorm else "")
            )
        # LoRA adapters, when a stage trains them, are part of the model from here on: the map sees them
        self.model_map: ModelMap
        self.model_map, self.adapters = adapt_and_map(
            self.model, batch_to(self.source.example_batch, self.runtime.device), self.config.stages
        )
        if self.adapters is not None:
            self.reporter.note(self.adapters.describe())
        self.recipe.check(self.model, self.model_map)
        self._choose_precision(recorded_runtime, timed=busy is None)
        self.reporter.note(f"device {self.runtime.device}, {self.runtime.reason}")
        if busy:
            self.reporter.note(busy)

    def _choose_precision(self, recorded: dict[str, Any] | None, timed: bool) -> None:
        """`precision: auto` on a CPU: the precision a resumed run started with, else what timing both on this model
        and a batch of the data says (on a busy machine only a cached timing: fresh ones would mislead)."""
        if not self.runtime.measurable:
            return
        if recorded is not None and recorded.get("precision") in ("bf16", "fp32"):
            precision = recorded["precision"]
            self.runtime = Runtime(self.runtime.device, precision, f"{precision}, as chosen when the run started")
            self.runtime_record = recorded
            return
        if is_main_process():
            size = min(8, self.config.data.batch_size)
            inputs, _ = next(iter(self.data.train_batches(size, seed=self.config.run.seed)))
            self.runtime, self.runtime_record = choose_precision(
                self.runtime,
                model_forward(self.model),
                self.model,
                batch_to(inputs, self.runtime.device),
                announce=self.reporter.note,
                # the other processes are loading or waiting meanwhile: only a timing cached before decides
                measure=timed and self.group is None,
                not_timed="the run's other processes share this machine, and timings would mislead"
                if self.group is not None
                else "other work was using the CPU, and timings would mislead",
            )
        # every process trains in the precision rank 0 chose (timings differ between processes)
        precision, reason, self.runtime_record = distributed.broadcast(
            (self.runtime.precision, self.runtime.reason, self.runtime_record), self.group
        )
        self.runtime = Runtime(self.runtime.device, precision, reason)

    @property
    def _world(self) -> int:
        """How many processes run this recipe."""
        return self.group.world if self.group is not None else 1

    def _write(self, name: str, text: str) -> None:
        if self.run_dir is not None and is_main_process():
            atomic_write_text(self.run_dir / name, text)

    # ---- the run ------------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None, write: bool = True, overwrite: bool = False) -> FitResult:
        """Run every stage (or continue a killed run from its last checkpoint).

        Everything that can be checked before training is checked before the run folder is made: the output
        folder, the data, the model, every stage's freeze spec, and on resume the checkpoint's integrity and the
        settings changed since. A start that fails before its first checkpoint leaves no run folder behind.

        Args:
            resume: the folder of a run to continue; `self.config` may differ from its config.json only in
                settings that are safe by construction (stages not begun yet, threads), which are recorded.
            write: write the run folder (False: train in memory only).
            overwrite: write into a non-empty folder that is not a frostline run (or replace a run there).

        Raises:
            FrostlineError: invalid data, settings or set-up, a non-finite loss, or frozen weights that moved.
        """
        start = time.perf_counter()
        self.config = with_resolved_paths(self.config)
        folder: Path | None = None
        checkpoint = None
        position = {"stage": 0, "epoch": 0, "done": None}
        if write and resume is not None:
            folder = run_folder.resume_dir(resume)
        elif write and is_main_process():
            # the other processes of a run never write: they have no run folder of their own
            folder = run_folder.choose_run_dir(self.config, overwrite)
        if resume is not None:
            # rank 0 first: reading completes a checkpoint a kill cut short; the other processes then read it as it is
            checkpoint = distributed.first_on_rank0(lambda: read_checkpoint(folder), self.group)
            position = checkpoint["trainer"]["position"]
            changes = self._check_resume_changes(folder, position, checkpoint["trainer"].get("processes", 1))
        recorded = (run_folder.read_record(folder) or {}).get("runtime") if resume is not None else None
        self._prepare(recorded)
        if resume is not None:
            self._check_resumed_adapters(folder)
        if write and is_main_process():
            if resume is None:
                run_folder.start(folder, self.runtime_record)
            elif changes:
                run_folder.record_resumed(
                    folder, f"stage {position['stage'] + 1}, epoch {position['epoch'] + 1}", changes
                )
        self.run_dir = folder if is_main_process() else None
        self._read_dir = folder
        if folder is not None and is_main_process() and self.config.run.tensorboard and tensorboard.available():
            self.reporter.note(f"TensorBoard: each epoch's numbers in {folder / 'tensorboard'} (tensorboard --logdir)")
        try:
            return self._fit(checkpoint, position, start)
        except BaseException:
            if resume is None and folder is not None and is_main_process():
                run_folder.clear_failed_start(folder)
            raise
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None
            distributed.leave(self._made_group)

    def _fit(self, checkpoint: dict[str, Any] | None, position: dict[str, Any], start: float) -> FitResult:
        # several processes keep the cache in memory, each all of it: a file only rank 0 could write and read would
        # let the processes disagree on what is cached
        folder = self.run_dir if self.group is None else None
        self.cache = FeatureCache(folder, self.config.run.cache_memory_mb, self.cache_dtype)
        if checkpoint is None:
            # the model was made from the run's seed in every process; from here each draws its own dropout masks
            distributed.seed_rank(self.config.run.seed, self.group)
        if checkpoint is not None:
            self.history = [EpochRecord.from_dict(r) for r in checkpoint["trainer"]["history"]]
            attach_examples(self.history, checkpoint["examples"])
            self.model.load_state_dict(checkpoint["model"])
            if (self._read_dir / "best.safetensors").is_file():
                self.best_state, note = distributed.first_on_rank0(
                    lambda: run_folder.read_weights(self._read_dir, "best.safetensors"), self.group
                )
                if note:
                    self.reporter.note(note)
            self.reporter.note(
                f"resuming {self._read_dir} at stage {position['stage'] + 1}, epoch {position['epoch'] + 1}"
            )
        self._write("config.json", json.dumps(self.config.to_dict(), indent=2))
        self._write("metrics.jsonl", "".join(json.dumps(r.to_dict()) + "\n" for r in self.history))
        self._write_head_json()
        if checkpoint is None:
            self._write("data.json", json.dumps(self._data_record(), indent=1))

        diagnosis: Diagnosis | None = None
        stop_reason = position["done"]
        for index in range(position["stage"], len(self.config.stages)):
            if stop_reason:
                break
            first_epoch = position["epoch"] if index == position["stage"] else 0
            diagnosis, stop_reason = self._run_stage(
                index, first_epoch, checkpoint if index == position["stage"] else None
            )
        if stop_reason is None:
            stop_reason = self.recipe.finished(self.history)
        if self.best_state is not None:
            self.model.load_state_dict({k: v.to(self.runtime.device) for k, v in self.best_state.items()})
        return self._result(stop_reason, diagnosis, time.perf_counter() - start)

    def _check_resumed_adapters(self, folder: Path) -> None:
        """A resumed run's model must carry the adapters its checkpoint was trained with.

        Raises:
            ConfigError: the config asks for other LoRA adapters (or none, or some where the run had none).
        """
        recorded = read_head(folder).get("lora") if (folder / "head.json").is_file() else None
        now = self.adapters.record() if self.adapters is not None else None
        if recorded != now:
            raise ConfigError(
                f"--resume {folder}: the run's model carries {recorded or 'no LoRA adapters'}, and this config's "
                f"stages make {now or 'none'}; the checkpoint's weights fit only the run's own: keep its lora "
                "stages' options (and add no lora stage to a run that had none)"
            )

    def _check_resume_changes(
        self, folder: Path, position: dict[str, Any], processes: int = 1
    ) -> list[tuple[str, Any, Any]]:
        """The settings changed since the run was started, when all are safe to change now.

        Safe by construction: anything about stages that have not begun (more epochs, another rate, another
        spec, added stages), how the run uses the machine (threads, the cache's memory budget), and the number of
        epochs of the stage in progress (not fewer than it has run): its schedule is rebuilt for the new length and
        continues from the step reached. Another number of processes than the run's `processes` is safe too: the
        stage in progress continues from the epochs it has done, at as many steps per epoch as the new global batch
        (batch size x processes) gives; `data.batch_size` may change with it when the global batch stays the same.
        Anything else would change what the run has already done.

        Raises:
            ConfigError: listing each unsafe change with its old and new value.
        """
        # only compared, never imported from: the caller chose the config that runs
        saved = with_resolved_paths(run_folder.read_run_config(folder, trust_code=True))
        changes = [c for c in config_changes(saved, self.config) if c[0] not in ("run.output", "run.name")]
        begun = position["stage"] + (1 if position["epoch"] > 0 else 0)
        world = self._world
        same_global_batch = saved.data.batch_size * processes == self.config.data.batch_size * world
        moved = processes != world
        unsafe = [
            c
            for c in changes
            if not (_safe_change(c, position) or (c[0] == "data.batch_size" and moved and same_global_batch))
        ]
        resized = any(c[0] == f"stages.{position['stage']}.epochs" for c in changes)
        if position["epoch"] > 0 and (resized or moved):
            self.resized_stage = position["stage"]
        if moved:
            self.reporter.note(
                f"resume: {world} process(es) instead of {processes}: a global batch of "
                f"{self.config.data.batch_size * world} examples per step (was {saved.data.batch_size * processes})"
            )

        if unsafe:
            lines = [f"  {key}: {old!r} -> {new!r}" for key, old, new in unsafe]
            raise ConfigError(
                [
                    f"--resume {folder}: these settings differ from the run's and would change what it has already "
                    f"done ({begun} stage(s) begun):",
                    *lines,
                    "keep them as they were to resume, or start a new run with these settings (another --output); "
                    "on resume, settings of stages not begun yet, the epochs of the stage in progress, and "
                    "run.threads may change",
                ]
            )
        for key, old, new in changes:
            self.reporter.note(f"resume: {key} changed from {old!r} to {new!r} (recorded in run.json)")
        return changes + ([("processes", processes, world)] if moved else [])

    def _run_stage(
        self, index: int, first_epoch: int, checkpoint: dict[str, Any] | None
    ) -> tuple[Diagnosis | None, str | None]:
        # the history up to the stage's start: a stage resumed mid-way has records of its own already
        stage = self.recipe.start(index, self.model, self.model_map, self.history[: len(self.history) - first_epoch])
        optimizer = adamw(stage.groups)
        # one global batch per step: batch_size examples for each process (each trains on its shard of it)
        batches = self.data.train_batches(self.config.data.batch_size * self._world, seed=self.config.run.seed + index)
        per_epoch = steps_per_epoch(len(batches), self.config.run.grad_accum)
        schedule = stage.schedule(optimizer, per_epoch)
        findings = stage.attach(optimizer)
        self.stage_plans[stage.config.name] = stage.plan.to_dict()
        if checkpoint is not None and checkpoint["optimizer"] is not None and first_epoch > 0:
            if index == self.resized_stage:
                # the stage's length changed on resume: its schedule is the one for the new length, at the step reached
                done = checkpoint["schedule"].get("last_epoch", first_epoch * per_epoch)
                if checkpoint["trainer"].get("processes", 1) != self._world:
                    done = first_epoch * per_epoch  # the epochs done, at this run's steps per epoch
                rates = _advance(schedule, int(done))
                optimizer.load_state_dict(checkpoint["optimizer"])
                for group, rate in zip(optimizer.param_groups, rates, strict=True):
                    group["lr"] = rate
            else:
                optimizer.load_state_dict(checkpoint["optimizer"])
                schedule.load_state_dict(checkpoint["schedule"])
        self.reporter.stage_start(index, stage.config, stage.plan, findings)
        forward, modules, batches, val_batches, cached = self._stage_inputs(index, stage.plan, batches)
        if checkpoint is not None:
            # at a stage boundary the new stage's batch order starts fresh, as in an uninterrupted run
            if first_epoch > 0:
                batches.generator.set_state(checkpoint["rng"]["batches"])
            torch.set_rng_state(checkpoint["rng"]["torch"])
            # the checkpoint holds rank 0's generator; the other processes draw their own dropout masks
            distributed.seed_rank(self.config.run.seed + len(self.history), self.group)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # several processes: DDP over the trainable part, each process on its shard of every global batch
        train_forward, unsynced = distributed.data_parallel(
            forward, modules, self.model, set(self.model_map.call_order), self.group
        )
        train_batches = (
            distributed.ShardedBatches(batches, self.group, getattr(self.loss_fn, "class_weight", None))
            if self.group is not None
            else batches
        )
        decision = None
        for epoch in range(first_epoch, stage.config.epochs):
            self.model.train()
            self.reporter.epoch_start(stage.config, len(self.history) + 1, len(batches))
            try:
                result = train_epoch(
                    train_forward,
                    trainable,
                    train_batches,
                    optimizer,
                    schedule,
                    self.runtime,
                    self.config.run.grad_accum,
                    self.config.run.clip_grad,
                    self.reporter.step,
                    self.loss_fn,
                )
            except NonFiniteLoss as err:
                raise FrostlineError(
                    f"stage {stage.config.name!r}, epoch {len(self.history) + 1}: {err}"
                    + (f"; checkpoint and best weights in {self.run_dir} are from before it" if self.run_dir else "")
                ) from err
            result = self._summed(result)
            if unsynced is not None and epoch == first_epoch:
                # a branch that runs only in training shows in the stage's first epoch; then the hooks go
                unsynced.check(self.group)
                unsynced.remove()
            # BatchNorm statistics: each process's last step moved its own; validation reads rank 0's, as DDP does
            distributed.broadcast_buffers(self.model, self.group)
            evaluation = self._gathered(evaluate(forward, val_batches, self.runtime, modules))
            record = self._record(stage, epoch, result, evaluation, optimizer)
            record.cache = cached["what"]
            record.cache_seconds = round(cached["seconds"], 3) if epoch == first_epoch else 0.0
            self.history.append(record)
            decision = self.recipe.decide(self.history, stage)
            if decision.best:
                self.best_state = model_tensors(self.model)
                if self.run_dir is not None and is_main_process():
                    run_folder.save_weights(
                        self.run_dir, "best.safetensors", self.best_state, metadata={"epoch": str(record.epoch)}
                    )
            next_position = {"stage": index, "epoch": epoch + 1, "done": decision.stop_reason}
            if decision.stop_reason is None and decision.end_stage:
                next_position = {"stage": index + 1, "epoch": 0, "done": None}
            self._save(next_position, optimizer, schedule, batches.generator)
            self.reporter.epoch_end(record, decision.diagnosis)
            if decision.note:
                self.reporter.note(decision.note)
            if decision.end_stage:
                break
        report = stage.finish()
        self.reporter.note(report.summary())
        if decision is None:
            return None, None
        return decision.diagnosis, decision.stop_reason

    def _stage_inputs(
        self, index: int, plan: FreezePlan, batches: TensorBatches
    ) -> tuple[Any, list[nn.Module], TensorBatches, TensorBatches, dict[str, Any]]:
        """The forward pass, modules and batches of stage `index`: from the feature cache when it is valid.

        A pass made now also keeps what later stages will read from the cache (`_ahead`), so a recipe runs the
        frozen part once. Cached batches are shuffled by a generator seeded like the plain ones, so both see the
        same order.
        """
        val_batches = distributed.shard_batches(self.data.val_batches(self.config.data.eval_batch_size), self.group)
        plain = (model_forward(self.model), [self.model], batches, val_batches, {"what": None, "seconds": 0.0})
        tail = plan_cache(self.config.run.cache, self.model, self.model_map, plan, self.data.augment)
        if isinstance(tail, str):
            self.reporter.note(f"feature cache: {tail}")
            return plain
        key = self._cache_key(tail, plan)
        ahead = self._ahead(index, plan, key)
        # the training batch size: the frozen part then sees the same shapes as in an uncached epoch
        size = self.config.data.batch_size
        splits = {}
        try:
            for split, inputs, transform, labels in (
                ("train", self.data.train_inputs, self.data.train_transform, self.data.train_labels),
                ("val", self.data.val_inputs, self.data.val_transform, self.data.val_labels),
            ):
                # several processes: each runs the frozen part on its share of the examples, then all are gathered
                shared = self.group is not None and len(labels) >= self._world
                if shared:
                    inputs = distributed.shard_inputs(inputs, self.group)
                label = f"caching {tail.describe}" if split == "train" else "caching validation"
                self.reporter.progress_start(label, math.ceil(len(labels) / self._world / size))
                splits[split] = self.cache.get(
                    self.model,
                    tail,
                    f"{key}-{split}",
                    inputs,
                    self.runtime,
                    size,
                    self.reporter.step,
                    transform,
                    [Ahead(a.tail, f"{a.key}-{split}", a.for_whom) for a in ahead],
                    gather=(lambda made: distributed.gather_agreed(made, self.group)) if shared else None,
                )
        except ValueError as err:
            if shared and not isinstance(err, distributed.FailedElsewhere):
                # the others wait to gather this process's share: tell them it failed, so that all train without
                distributed.gather_agreed(None, self.group)
            self.reporter.note(f"feature cache: off: {err}")
            return plain
        finally:
            self.reporter.progress_start("", 0)
        (train, train_kept), (val, val_kept) = splits["train"], splits["val"]
        seconds = train.seconds + val.seconds
        made = f", made in {seconds:.1f}s" if seconds > 0 else ""
        self.reporter.note(
            f"feature cache: on: {tail.describe}, {_describe_size(train.features, val.features)} in {train.where}"
            f"{made}; epochs run only the trainable part"
        )
        kept_val = {a.for_whom: entry for a, entry in val_kept}
        for a, kept_train in train_kept:
            if a.for_whom not in kept_val:
                continue
            self.reporter.note(
                f"feature cache: the same pass kept {a.tail.describe} for {a.for_whom}, "
                f"{_describe_size(kept_train.features, kept_val[a.for_whom].features)} in {kept_train.where}"
            )
        cached_batches = TensorBatches(
            train.features, self.data.train_labels, batches.batch_size, shuffle=True, seed=batches.seed
        )

        def forward(features: Any) -> torch.Tensor:
            return tail.forward(_as_float(features))

        return (
            forward,
            tail.modules,
            cached_batches,
            distributed.shard_batches(
                TensorBatches(val.features, self.data.val_labels, self.config.data.eval_batch_size), self.group
            ),
            {"what": tail.describe, "seconds": seconds},
        )

    def _cache_key(self, tail: Tail, plan: FreezePlan) -> str:
        """The cache key of `tail` under `plan` (applied or not: its frozen weights are those outside the plan's
        trainable set, whatever the model's flags say now)."""
        return fingerprint(
            self.model,
            tail.boundary,
            [self.data.train_inputs, self.data.val_inputs],
            self.cache_dtype,
            f"{self.data.train_transform!r}|{self.data.val_transform!r}",
            plan.trainable,
        )

    def _ahead(self, index: int, plan: FreezePlan, key: str) -> list[Ahead]:
        """The cached features of later stages that stage `index`'s pass can keep: each such stage's cache is valid,
        its boundary differs, and every weight it keeps frozen is frozen in each stage before it from this one on
        (so the weights are the same when it starts, and its key, computed now, is the one it will look up)."""
        ahead: list[Ahead] = []
        trained = set(plan.trainable)
        for later_index in range(index + 1, len(self.config.stages)):
            later = self.config.stages[later_index]
            later_plan = plan_freeze(self.model, later.freeze, self.model_map)
            if not trained <= later_plan.trainable:
                break
            trained |= later_plan.trainable
            tail = plan_cache(self.config.run.cache, self.model, self.model_map, later_plan, self.data.augment)
            if isinstance(tail, str):
                continue
            later_key = self._cache_key(tail, later_plan)
            if later_key != key and all(a.key != later_key for a in ahead):
                ahead.append(Ahead(tail, later_key, f"stage {later.name!r}"))
        return ahead

    def _summed(self, result: EpochResult) -> EpochResult:
        """The epoch's training loss and accuracy over every process's shards (the process's own for one)."""
        if self.group is None:
            return result
        loss, correct, seen = distributed.sum_over(
            [result.loss * result.seen, result.accuracy * result.seen, result.seen], self.group
        )
        return dataclasses.replace(result, loss=loss / max(seen, 1), accuracy=correct / max(seen, 1), seen=int(seen))

    def _gathered(self, evaluation: EvalResult) -> EvalResult:
        """Every process's validation results joined in the examples' order: each process then holds them all, and
        the stage engine decides the same in each."""
        if self.group is None:
            return evaluation
        parts = (evaluation.losses, evaluation.correct, evaluation.predictions, evaluation.probabilities)
        return EvalResult.of(*(distributed.gather(t, self.group) for t in parts), evaluation.seconds)

    def _record(self, stage: Stage, epoch: int, result: EpochResult, evaluation: EvalResult, optimizer) -> EpochRecord:
        return stage.record(
            self.history,
            result.loss,
            evaluation.loss,
            evaluation.accuracy,
            ValidationExamples(evaluation.losses, evaluation.correct, evaluation.predictions, self.data.val_labels),
            train_accuracy=result.accuracy,
            lr=group_rates(optimizer),
            lr_trace=result.lr_trace,
            steps=result.steps,
            train_seconds=round(result.seconds, 3),
            eval_seconds=round(evaluation.seconds, 3),
        )

    def _save(self, position: dict[str, Any], optimizer, schedule, generator: torch.Generator) -> None:
        if self.run_dir is None or not is_main_process():
            return
        rng = {"torch": torch.get_rng_state(), "batches": generator.get_state()}
        state = {"position": position, "history": [r.to_dict() for r in self.history], "processes": self._world}
        save_checkpoint(self.run_dir, self.model, optimizer, schedule, rng, state, examples_tensors(self.history))
        with (self.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(self.history[-1].to_dict()) + "\n")
        if self.config.run.tensorboard and tensorboard.available():
            # opened at the first epoch written: a start that fails before it leaves no folder behind
            if self.tensorboard is None:
                self.tensorboard = tensorboard.TensorBoardLog(self.run_dir / "tensorboard")
            self.tensorboard.epoch(self.history[-1])

    def _data_record(self) -> dict[str, Any]:
        """What lets `frostline eval` find this run's validation split again, and what reading the data did."""
        return {
            "ref": self.config.data.ref,
            "val_ref": self.config.data.val_ref,
            "fingerprint": self.data.fingerprint,
            "train_examples": len(self.data.train_labels),
            "val_examples": len(self.data.val_labels),
            "val_indices": self.data.val_indices,
            "notes": self.data.notes,
        }

    def _write_head_json(self) -> None:
        head = {
            "model": self.config.model.ref,
            "head": self.model_map.head,
            "num_classes": len(self.data.label_names),
            "labels": self.data.label_names,
            "max_length": self.config.data.max_length,
            "windows": self.config.data.windows,
        }
        if self.adapters is not None:
            # what rebuilds the same adapters before the weights are loaded (frostline.runs.load_run)
            head["lora"] = self.adapters.record()
        self._write("head.json", json.dumps(head, indent=2))

    def _result(self, stop_reason: str, diagnosis: Diagnosis | None, seconds: float) -> FitResult:
        best = self.history[self.recipe.monitor.best_index(self.history)] if self.history else None
        return FitResult(
            history=self.history,
            best_epoch=best.epoch if best else 0,
            best_stage=best.stage if best else "",
            best_val_accuracy=best.val_accuracy if best else math.nan,
            best_val_loss=best.val_loss if best else math.nan,
            stop_reason=stop_reason,
            diagnosis=diagnosis,
            overfit_began=diagnosis.began_epoch
            if diagnosis is not None and diagnosis.verdict == "overfitting"
            else None,
            run_dir=self.run_dir,
            seconds=seconds,
            label_names=self.data.label_names,
            stage_plans=self.stage_plans,
        )


_MACHINE_SETTINGS = ("run.threads", "run.cache_memory_mb", "run.tensorboard")


def _safe_change(change: tuple[str, Any, Any], position: dict[str, Any]) -> bool:
    """Whether a (key, old, new) change on resume leaves what the run has done valid, at checkpoint `position`:
    machine settings, any setting of a stage not begun, or the epochs of the stage in progress (not fewer than ran)."""
    key, _, new = change
    if key in _MACHINE_SETTINGS:
        return True
    begun = position["stage"] + (1 if position["epoch"] > 0 else 0)
    parts = key.split(".")
    if parts[0] != "stages" or len(parts) < 2 or not parts[1].isdigit():
        return False
    if int(parts[1]) >= begun:
        return True
    return key == f"stages.{position['stage']}.epochs" and isinstance(new, int) and new >= position["epoch"]


def _advance(schedule: Any, steps: int) -> list[float]:
    """Step a fresh schedule `steps` times (no optimizer step between) and return the rates it reached."""
    with warnings.catch_warnings():
        # stepping a schedule before its optimizer is exactly what fast-forwarding means here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            schedule.step()
    return [group["lr"] for group in schedule.optimizer.param_groups]


def _as_float(features: Any) -> Any:
    if isinstance(features, dict):
        return {k: v.float() if v.is_floating_point() else v for k, v in features.items()}
    return features.float()


def _describe_size(*splits: Any) -> str:
    def tensors(f: Any) -> list[torch.Tensor]:
        return list(f.values()) if isinstance(f, dict) else [f]

    total = sum(t.numel() * t.element_size() for f in splits for t in tensors(f))
    first = tensors(splits[0])[0]
    return f"{tuple(first.shape)} {str(first.dtype).removeprefix('torch.')}, {total / 2**20:,.1f} MB"


def fit(
    config: FitConfig | None = None,
    reporter: Reporter | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
) -> FitResult:
    """Fine-tune as `config` says (the embedded default: MiniLM on BBC News) and write the run folder."""
    return Trainer(config or FitConfig(), reporter).fit(resume=resume, overwrite=overwrite)
