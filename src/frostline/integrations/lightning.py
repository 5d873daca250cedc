"""frostline's recipe inside a PyTorch Lightning `Trainer`: staged unfreezing with fresh groups, proved and resumable.

    import lightning.pytorch as L
    from frostline import StageConfig
    from frostline.integrations.lightning import FrostlineRecipe

    recipe = FrostlineRecipe(
        [StageConfig("head", "head", epochs=3, lr=1e-2), StageConfig("last2", "last:2", epochs=3, lr=1e-4, head_lr_mult=10)],
        model="net",                    # the attribute of your LightningModule that holds the pretrained model
    )
    trainer = L.Trainer(max_epochs=6, callbacks=[recipe])
    trainer.fit(module)                 # recipe.history, recipe.diagnosis, recipe.stop_reason afterwards

Every stage decision comes from `frostline.recipe` (the engine `frostline fit` runs on); this module only places them
in Lightning's hooks:

- fit start: map the model (`inspect_model` on `example_input_array`), check every stage's spec, start the stage
  (freeze, fresh parameter groups with their rates), and install the stage's optimizer and per-step schedule in the
  trainer (`trainer.strategy.optimizers` / `lr_scheduler_configs`), replacing what `configure_optimizers` returned;
- each validation's end (once per epoch, sanity check skipped): a record of the epoch, `Recipe.decide`; the best
  weights are kept (a CPU copy); a stage that ends is proved by its guard and the next stage is started right away,
  so the next epoch trains it and a checkpoint saved at this epoch's end already holds that stage's optimizer;
  the end of the run sets `trainer.should_stop`;
- fit end: the guard of a stage still running, then (when the recipe is over) the best weights are loaded back.

What your LightningModule must do:

- keep the model being fine-tuned in one attribute (`model="net"`), or be that model (`model=None`, the default);
- set `example_input_array` to an input of that model (or pass `example_batch=`): the map follows forward order;
- return the loss from `training_step` (automatic optimization), and log `val_loss` and `val_accuracy` (or `val_acc`)
  in `validation_step`; other names: `FrostlineRecipe(val_loss=..., val_accuracy=...)`. Calling
  `recipe.record_validation(logits, labels)` there too lets the monitor measure each change against the validation
  set's noise, paired over the same examples. The training loss of an
  epoch is the mean of the losses `training_step` returned (`train_loss=NAME` reads a logged metric instead);
- define `configure_optimizers` (Lightning requires one), returning any optimizer: it is replaced before the first
  step by each stage's AdamW over `stage.groups` (or `optimizer=`) and its schedule, stepped every step;
- validate once at the end of every epoch (Lightning's default), and let the recipe stop the run (`max_epochs` at
  least the recipe's epochs; `min_epochs` unset).

Several processes (`strategy="ddp"`, or any launcher that starts one process per device: torchrun, SLURM): every
stage is wrapped in DistributedDataParallel again after its freeze, with the strategy's own settings, so DDP registers
exactly the tensors the stage trains: frozen ones never reach its reducer, and a tensor a later stage unfreezes is
synced from that stage on (a wrapper built once, before the freeze, would do neither). Trainable tensors of modules the
map's example forward (eval mode) never ran are left out by name, so `find_unused_parameters` is not needed; one that
gets a gradient at the stage's first step anyway (a branch that runs only in training) stops every process with its
name (`DDPStrategy(find_unused_parameters=True)` leaves nothing out and syncs it). The recipe decides
the same in every process: the validation loss and accuracy are averaged over the processes (equal to the logged
values when you log with `sync_dist=True`), the training loss is the mean over all processes' examples, and the
examples given to `record_validation` are gathered. `ddp_spawn` and `ddp_notebook` are refused: they train in
processes that hand back only the weights, so the recipe's history and verdict would be lost; so is `ddp_comm_state`
(kept per gradient bucket, and the buckets change at every stage). Tested: CPU, gloo, two processes
(`tests/test_distributed_integrations.py`).

Why not `BaseFinetuning`: it adds each unfrozen module as a new group of the optimizer it already has, so the earlier
groups keep their rates and their AdamW state, and on resume (Lightning issues #6891, #8502, #21901) the groups
and `requires_grad` it rebuilds do not match the checkpoint. Here a stage never inherits an optimizer: it gets fresh
groups of its trainable tensors only, so no frozen tensor is ever in an optimizer with weight decay or momentum.

Resume: the callback's state (stage, history, the best weights that differ from the saved ones) rides in every
Lightning checkpoint. On `fit(ckpt_path=...)` it is loaded before the optimizers are made; at fit start the stage it
names is started again (its freeze, its groups), and Lightning then restores that checkpoint's optimizer and schedule
state into them: the checkpoint's optimizer always belongs to the stage its state names, because a stage switch
happens before the epoch's checkpoint is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.data import extract_batch_size
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
    from lightning.pytorch.utilities.types import LRSchedulerConfig
except ImportError as err:  # pragma: no cover - the extra is absent
    raise ImportError(
        "frostline.integrations.lightning needs PyTorch Lightning: pip install 'frostline[lightning]'"
    ) from err

from frostline.batches import Batch, batch_to
from frostline.checkpoint import model_tensors
from frostline.config import FitConfig, StageConfig, load_config
from frostline.errors import ConfigError
from frostline.guard import Finding, GuardReport
from frostline.inspect import ModelMap, inspect_model
from frostline.optim import adamw, group_rates
from frostline.recipe import EpochRecord, Recipe, Stage, steps_per_epoch
from frostline.train import distributed
from frostline.train.evidence import (
    ValidationExamples,
    attach_examples,
    examples_from_logits,
    examples_tensors,
    join_examples,
)
from frostline.train.monitor import Diagnosis

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class FrostlineRecipe(Callback):
    """Runs a frostline recipe (a list of stages) in a Lightning `Trainer`; every decision comes from `Recipe`.

    Args:
        recipe: the stages (`StageConfig`s), a YAML config file or `FitConfig` (its stages, patience and
            min_delta), or a `Recipe`.
        model: attribute path of the model to fine-tune inside the LightningModule; None: the module itself.
        example_batch: an input of that model; default the LightningModule's `example_input_array`.
        val_loss: the logged metric holding the validation loss.
        val_accuracy: the logged metric holding the validation accuracy (the first name logged is used).
        train_loss: a logged metric holding the epoch's training loss at validation's end; None (the default): the
            mean of the losses `training_step` returned in the epoch.
        patience: epochs without a better validation result before the monitor's verdict changes (stage lists).
        min_delta: the smallest rise in validation accuracy that counts as better (stage lists).
        optimizer: makes each stage's optimizer from its parameter groups; default `frostline.optim.adamw` (AdamW,
            fused where supported), as `frostline fit`.
        restore_best: load the best weights back when the recipe is over.
    """

    def __init__(
        self,
        recipe: Recipe | FitConfig | Sequence[StageConfig] | str | Path,
        *,
        model: str | None = None,
        example_batch: Batch | None = None,
        val_loss: str = "val_loss",
        val_accuracy: str | Sequence[str] = ("val_accuracy", "val_acc"),
        train_loss: str | None = None,
        patience: int = 2,
        min_delta: float = 0.0,
        optimizer: OptimizerFactory | None = None,
        restore_best: bool = True,
    ):
        self.recipe = _as_recipe(recipe, patience, min_delta)
        self.model_path = model
        self.example_batch = example_batch
        self.metric_names = {
            "val_loss": (val_loss,),
            "val_accuracy": (val_accuracy,) if isinstance(val_accuracy, str) else tuple(val_accuracy),
        }
        self.train_loss_name = train_loss
        self.make_optimizer: OptimizerFactory = optimizer or adamw
        self.restore_best = restore_best

        self.history: list[EpochRecord] = []
        """One record per epoch, across stages (restored on resume)."""
        self.stage: Stage | None = None
        """The stage in progress: its plan, groups, findings and guard."""
        self.stage_index = 0
        self.stage_plans: dict[str, dict[str, Any]] = {}
        """Each stage's freeze plan as `FreezePlan.to_dict()`, by stage name (as `FitResult.stage_plans`)."""
        self.findings: dict[str, list[Finding]] = {}
        """The set-up lint of each stage started in this process."""
        self.guard_reports: dict[str, GuardReport] = {}
        self.diagnosis: Diagnosis | None = None
        """The monitor's verdict after the last epoch."""
        self.done = False
        """The recipe is over: its last stage ended, or the monitor ended the run."""
        self.stop_reason: str | None = None
        """Why the recipe ended, for people (None while it has not)."""
        self.best_state: dict[str, torch.Tensor] | None = None
        """CPU copy of the best weights so far (the fine-tuned model's state_dict)."""
        self.best_epoch: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: torch.optim.lr_scheduler.LRScheduler | None = None

        self._ignored_by_user: list[str] | None = None
        self._unsynced: distributed.Unsynced | None = None
        """Trainable tensors left out of DDP (never run in the map's forward), checked at the stage's first backward."""
        self._model: nn.Module | None = None
        self._model_map: ModelMap | None = None
        self._restored: dict[str, Any] | None = None
        self._tally: dict[str, Any] = _fresh_tally(0)
        self._awaiting_decision = False
        self._examples: list[ValidationExamples] = []

    def record_validation(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Call in `validation_step` with the batch's logits and labels: the monitor then knows each validation
        example's loss and correctness, and compares epochs paired over the same examples (without it, it reads the
        validation set's size off the accuracy's steps)."""
        self._examples.append(examples_from_logits(logits, labels))

    # ---- fit start ------------------------------------------------------------------------------
    @property
    def epochs(self) -> int:
        """Epochs the whole recipe may run: `L.Trainer(max_epochs=recipe.epochs)`."""
        return self.recipe.epochs

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_trainer(trainer, pl_module)
        model = _submodule(pl_module, self.model_path)
        if self._restored is None and self.stage is not None:
            # a second fit in this process, without a checkpoint: the stage goes on with its own optimizer and schedule
            if self.stage.model is not model:
                raise ConfigError(
                    "this FrostlineRecipe already ran on another model; make one FrostlineRecipe per model"
                )
            self._install(trainer)
        else:
            device = next(model.parameters()).device
            batch = _example(self.example_batch, pl_module)
            self._model_map = inspect_model(model, batch_to(batch, device) if batch is not None else None)
            self.recipe.check(model, self._model_map)
            self._model = model
            resuming = self._restored is not None
            if resuming:
                self._resume(self._restored)
                self._restored = None
            self._start(trainer, self.stage_index, resuming)
        # frozen entries go back to eval at their first forward (freeze's holds); Lightning warns of eval modules
        model.train()
        if self.done:
            trainer.should_stop = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After Lightning restored a checkpoint's optimizer state: it must be the state of this stage's groups."""
        if self.stage is None:
            return
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        expected = [(g["name"], [id(p) for p in g["params"]]) for g in self.stage.groups]
        found = [(g.get("name"), [id(p) for p in g["params"]]) for g in optimizer.param_groups] if optimizer else []
        if optimizer is not self.optimizer or found != expected:
            raise ConfigError(
                f"the trainer's optimizer does not hold stage {self.stage.config.name!r}'s parameter groups "
                f"({', '.join(n for n, _ in expected)}), got {', '.join(str(n) for n, _ in found) or 'none'}; "
                "another callback replaced it, or the checkpoint's optimizer belongs to another stage "
                "(resume from checkpoints saved with FrostlineRecipe)"
            )

    # ---- each epoch -----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._model is None:
            return
        # Lightning restores the modes it saw before validation rather than calling train(): a block the new stage
        # unfroze would stay in eval; frozen entries return to eval at their first forward (freeze's holds)
        self._model.train()
        self._tally = _fresh_tally(trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if self.stage is None or not isinstance(loss, torch.Tensor):
            return
        size = extract_batch_size(batch)
        # Lightning hands back the loss divided by accumulate_grad_batches
        weighted = loss.detach().float() * (trainer.accumulate_grad_batches * size)
        self._tally["loss"] = self._tally["loss"] + weighted
        self._tally["seen"] += size
        self._awaiting_decision = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The stage's first backward: a tensor left out of DDP because the map's (eval-mode) forward never ran it
        must have got no gradient (DDPStrategy(find_unused_parameters=True) leaves nothing out, and syncs it)."""
        if self._unsynced is None:
            return
        unsynced, self._unsynced = self._unsynced, None
        unsynced.check(distributed.current())
        unsynced.remove()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tally["validation"] = time.perf_counter()
        self._examples = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage is None or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.sanity_checking:
            self._epoch_metrics(trainer, with_train_loss=False)  # a missing metric is named before the first step
            return
        stage = self.stage
        examples = _gathered(join_examples(self._examples))
        record = stage.record(self.history, *self._epoch_metrics(trainer), examples, **self._epoch_extras(trainer))
        self.history.append(record)
        decision = self.recipe.decide(self.history, stage)
        self.diagnosis = decision.diagnosis
        # the epoch is counted: a checkpoint saved from here on resumes at the next epoch
        self._tally, self._awaiting_decision = _fresh_tally(trainer.global_step), False
        if decision.diagnosis.should_stop and decision.diagnosis.message:
            rank_zero_info(f"frostline: epoch {record.epoch}: {decision.diagnosis.message}")
        if decision.best:
            self.best_state = model_tensors(stage.model)
            self.best_epoch = record.epoch
        if not decision.end_stage:
            return
        self.guard_reports[stage.config.name] = report = stage.finish()
        rank_zero_info(f"frostline: stage {stage.config.name!r} ended; {report.summary()}")
        if decision.note:
            rank_zero_info(f"frostline: {decision.note}")
        if decision.end_run:
            self.done = True
            self.stop_reason = decision.stop_reason or self.recipe.finished(self.history)
            trainer.should_stop = True
        else:
            # no stale gradient outlives its stage; the next epoch trains the next stage
            stage.model.zero_grad(set_to_none=True)
            self._start(trainer, stage.index + 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._awaiting_decision:
            raise ConfigError(
                f"epoch {trainer.current_epoch + 1} trained without a validation, and the recipe decides after each "
                "epoch's validation: define validation_step and a val_dataloader, keep limit_val_batches > 0"
            )

    # ---- fit end --------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self.stage
        if stage is None:
            return
        if not self.done:
            # the trainer stopped inside the recipe: prove the stage so far; a later fit or checkpoint continues it
            self.guard_reports[stage.config.name] = stage.finish()
            ran = sum(1 for r in self.history if r.stage_index == stage.index)
            rank_zero_info(
                f"frostline: the trainer stopped before the recipe ended (stage {stage.config.name!r}, {ran} of "
                f"{stage.config.epochs} epochs); the last weights stay, so a checkpoint saved now resumes here"
            )
        elif self.restore_best and self.best_state is not None:
            device = next(stage.model.parameters()).device
            stage.model.load_state_dict({k: v.to(device) for k, v in self.best_state.items()})
            rank_zero_info(f"frostline: {self.stop_reason}; best weights (epoch {self.best_epoch}) loaded")

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._restored is not None:
            return dict(self._restored)
        tally = dict(self._tally)
        # Lightning saves on every process and writes rank 0's: the tally is the sum over the processes
        tally["loss"], tally["seen"] = distributed.sum_over(
            [float(tally["loss"]), float(tally["seen"])], distributed.current()
        )
        tally["seen"] = round(tally["seen"])
        tally.pop("start", None)
        tally.pop("validation", None)
        return {
            "version": 1,
            "stages": [dataclasses.asdict(s) for s in self.recipe.stages],
            "stage": self.stage_index,
            "stage_epoch": sum(1 for r in self.history if r.stage_index == self.stage_index),
            "history": [r.to_dict() for r in self.history],
            "examples": examples_tensors(self.history),
            "done": self.done,
            "stop_reason": self.stop_reason,
            "diagnosis": self.diagnosis.to_dict() if self.diagnosis is not None else None,
            "stage_plans": self.stage_plans,
            "best_epoch": self.best_epoch,
            "best_changed": self._best_changed(),
            "epoch_tally": tally,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict
        self.history = [EpochRecord.from_dict(r) for r in state_dict["history"]]
        attach_examples(self.history, state_dict.get("examples", {}))
        self.stage_index = state_dict["stage"]
        self.done = state_dict["done"]
        self.stop_reason = state_dict["stop_reason"]
        self.diagnosis = Diagnosis(**state_dict["diagnosis"]) if state_dict["diagnosis"] else None
        self.stage_plans = dict(state_dict["stage_plans"])
        self.best_epoch = state_dict["best_epoch"]
        self.stage = None

    # ---- the parts ------------------------------------------------------------------------------
    def _start(self, trainer: pl.Trainer, index: int, resuming: bool = False) -> None:
        """Start stage `index` (freeze, fresh groups), lint it with its own optimizer, and install that optimizer.

        On resume the checkpoint's record of the stage's plan is kept: it counts what trained before the stage began,
        where the plan made now counts the freshly loaded model's flags (requires_grad is not in checkpoints).
        """
        stage = self.recipe.start(index, self._model, self._model_map, self.history)
        self.stage, self.stage_index = stage, index
        self.optimizer = self.make_optimizer(stage.groups)
        self.schedule = stage.schedule(self.optimizer, _steps_per_epoch(trainer))
        self.findings[stage.config.name] = findings = stage.attach(self.optimizer)
        if not (resuming and stage.config.name in self.stage_plans):
            self.stage_plans[stage.config.name] = stage.plan.to_dict()
        self._install(trainer)
        lines = [f"frostline: stage {index + 1} {stage.config.name!r}: {stage.plan.summary()}"]
        lines += [f"  {f}" for f in findings]
        rank_zero_info("\n".join(lines))

    def _install(self, trainer: pl.Trainer) -> None:
        """The stage's optimizer and schedule in the trainer, and (several processes) its DDP wrapper."""
        trainer.strategy.optimizers = [self.optimizer]
        trainer.strategy.lr_scheduler_configs = [LRSchedulerConfig(self.schedule, interval="step")]
        self._wrap(trainer)

    def _wrap(self, trainer: pl.Trainer) -> None:
        """Several processes: DDP over the LightningModule again, now that the stage's trainable set is fixed.

        The strategy's own `_setup_model` builds it (its device ids and DDP settings) and its communication hooks are
        registered again. DDP registers only tensors that require grad: the stage's. The wrapper it replaces is
        released before the next step, so its reducer's gradient hooks go with it.
        """
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
            return
        pl_module = strategy.lightning_module
        if self._ignored_by_user is None:
            self._ignored_by_user = list(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []))
        # DDP that searches for unused tensors needs no list (and must sync a branch that runs only in training)
        searches = bool(strategy._ddp_kwargs.get("find_unused_parameters"))
        ignored = [] if searches else distributed.never_run(pl_module, self._model, set(self._model_map.call_order))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(pl_module, self._ignored_by_user + ignored)
        if self._unsynced is not None:
            self._unsynced.remove()
        self._unsynced = distributed.Unsynced(
            pl_module, ignored, "run with strategy=DDPStrategy(find_unused_parameters=True), which syncs them"
        )
        strategy.model = pl_module
        gc.collect()
        strategy.model = strategy._setup_model(pl_module)
        strategy._register_ddp_hooks()

    def _resume(self, state: dict[str, Any]) -> None:
        """Check that the stages begun are the checkpoint's, and put its best weights and epoch tally back."""
        saved = state["stages"]
        now = [dataclasses.asdict(s) for s in self.recipe.stages]
        changed = [
            f"stages.{i}: {saved[i]} -> {now[i] if i < len(now) else 'absent'}"
            for i in range(min(state["stage"] + 1, len(saved)))
            if i >= len(now) or now[i] != saved[i]
        ]
        if changed:
            raise ConfigError(
                [
                    "the checkpoint was taken with other settings for the stages it had begun:",
                    *changed,
                    "resume with the same stages (later stages may change), or start a new fit",
                ]
            )
        if state["best_changed"] is not None:
            best = model_tensors(self._model)
            best.update(state["best_changed"])
            self.best_state = best
        self._tally = {**_fresh_tally(0), **state["epoch_tally"]}
        group = distributed.current()
        if group is not None and group.rank > 0:
            # the saved tally is every process's: rank 0 carries it, and the sum over the processes counts it once
            self._tally.update(loss=0.0, seen=0)
        self._awaiting_decision = self._tally["seen"] > 0

    def _best_changed(self) -> dict[str, torch.Tensor] | None:
        """The best weights that differ from the model's now: the model's own tensors are in the checkpoint."""
        if self.best_state is None or self._model is None:
            return None
        if self.history and self.best_epoch == self.history[-1].epoch:
            # the best weights are the model's own: nothing to compare (or copy off the device)
            return {}
        now = self._model.state_dict()
        return {k: v for k, v in self.best_state.items() if k not in now or not torch.equal(v, now[k].cpu())}

    def _epoch_metrics(self, trainer: pl.Trainer, with_train_loss: bool = True) -> tuple[float, float, float]:
        """The epoch's training loss, validation loss and accuracy, from the logged metrics and training_step.

        Raises:
            ConfigError: a metric the monitor reads was not logged (with the names that were).
        """
        metrics = trainer.callback_metrics
        names = {"val_loss": self.metric_names["val_loss"], "val_accuracy": self.metric_names["val_accuracy"]}
        if self.train_loss_name is not None and with_train_loss:
            names["train_loss"] = (self.train_loss_name,)
        values, missing = {}, []
        for field, candidates in names.items():
            found = next((n for n in candidates if n in metrics), None)
            if found is None:
                missing.append((field, candidates))
            else:
                values[field] = float(metrics[found])
        elsewhere = _count_over_processes(len(missing)) - len(missing)
        if elsewhere and not missing:
            # every process stops here together: a process that went on into the averaging below would wait forever
            raise ConfigError(
                "another process did not log a metric the recipe's monitor reads (its error names it); log the "
                "validation metrics in every process (not rank_zero_only)"
            )
        if missing:
            logged = sorted(metrics)
            problems = []
            for field, candidates in missing:
                close = difflib.get_close_matches(candidates[0], logged, n=2, cutoff=0.5)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                problems.append(
                    f"the recipe's monitor reads {field} from the logged metric {' or '.join(candidates)}, which was "
                    f"not logged{hint}; log it (self.log({candidates[0]!r}, value) in validation_step) or name yours "
                    f"with FrostlineRecipe({field}=...)"
                )
            problems.append(f"logged metrics: {', '.join(logged) or 'none'}")
            raise ConfigError(problems)
        values = _mean_over_processes(values)
        loss, seen = distributed.sum_over([float(self._tally["loss"]), self._tally["seen"]], distributed.current())
        if not with_train_loss:
            return math.nan, values["val_loss"], values["val_accuracy"]
        if "train_loss" not in values:
            if seen == 0:
                raise ConfigError(
                    "the epoch's training loss is the mean of the losses training_step returns, and none came back; "
                    "return the loss from training_step, or name a logged metric with FrostlineRecipe(train_loss=...)"
                )
            values["train_loss"] = loss / seen
        return values["train_loss"], values["val_loss"], values["val_accuracy"]

    def _epoch_extras(self, trainer: pl.Trainer) -> dict[str, Any]:
        now = time.perf_counter()
        validation = self._tally.get("validation") or now
        start = self._tally.get("start") or validation
        return {
            "lr": group_rates(self.optimizer),
            "steps": trainer.global_step - self._tally["step"],
            "train_seconds": round(validation - start, 3),
            "eval_seconds": round(now - validation, 3),
        }


def _mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the processes (unchanged by it when every process logged the same value)."""
    group = distributed.current()
    if group is None:
        return values
    summed = distributed.sum_over(list(values.values()), group)
    return {k: v / group.world for k, v in zip(values, summed, strict=True)}


def _count_over_processes(count: int) -> int:
    """`count` summed over the processes (itself in one process)."""
    group = distributed.current()
    return count if group is None else round(distributed.sum_over([float(count)], group)[0])


def _gathered(examples: ValidationExamples | None) -> ValidationExamples | None:
    """Every process's validation examples, in rank order (the same order every epoch).

    Raises:
        ConfigError: some processes recorded examples and others none (every process raises it).
    """
    group = distributed.current()
    if group is None:
        return examples
    recorded = _count_over_processes(int(examples is not None))
    if recorded == 0:
        return None
    if recorded < group.world:
        raise ConfigError(
            f"record_validation was called in {recorded} of {group.world} processes; call it in validation_step in "
            "every process (not rank_zero_only), or in none"
        )
    fields = {k: v for k, v in vars(examples).items() if v is not None}
    return ValidationExamples(**distributed.gather(fields, group))


def _fresh_tally(step: int) -> dict[str, Any]:
    """What an epoch adds up while it trains: its weighted loss, examples seen, first step, start time."""
    return {"loss": 0.0, "seen": 0, "step": step, "start": time.perf_counter(), "validation": None}


def _as_recipe(
    recipe: Recipe | FitConfig | Sequence[StageConfig] | str | Path, patience: int, min_delta: float
) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, FitConfig):
        return Recipe.from_config(recipe)
    if isinstance(recipe, (str, Path)):
        return Recipe.from_config(load_config(recipe))
    stages = list(recipe)
    wrong = [f"stages[{i}] is a {type(s).__name__}" for i, s in enumerate(stages) if not isinstance(s, StageConfig)]
    if wrong:
        raise ConfigError(
            [*wrong, "a recipe is a list of frostline.StageConfig, a config file, a FitConfig or a Recipe"]
        )
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must differ (plans, guards and checkpoints are kept by name), got {names}")
    return Recipe(stages, patience=patience, min_delta=min_delta)


def _check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """What the recipe needs of the trainer, every problem at once."""
    problems = []
    strategy = trainer.strategy
    data_parallel = isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
    if not (isinstance(strategy, SingleDeviceStrategy) or data_parallel):
        problems.append(
            f"strategy {type(strategy).__name__}: the recipe runs on one device or under DDPStrategy; sharded and "
            "other wrappers fix the trainable tensors when they wrap the model, and a stage that unfreezes more would "
            "train them out of sync"
        )
    elif data_parallel and getattr(strategy, "_ddp_comm_state", None) is not None:
        problems.append(
            "DDPStrategy(ddp_comm_state=...): a communication hook's state (PowerSGD's error feedback, say) is kept "
            "per gradient bucket, and the buckets change with every stage's trainable tensors; leave it unset"
        )
    elif data_parallel and getattr(strategy, "_start_method", "popen") != "popen":
        problems.append(
            f"strategy ddp with start method {strategy._start_method!r} (ddp_spawn, ddp_notebook) trains in processes "
            "that hand back only the weights, so the recipe's history and verdict would be lost; use strategy='ddp' "
            "(it runs your script once per device) or start the processes with torchrun"
        )
    if not pl_module.automatic_optimization:
        problems.append(
            "automatic_optimization is False: the recipe installs each stage's optimizer and steps its schedule "
            "through Lightning's automatic optimization; leave it on"
        )
    if (
        trainer.check_val_every_n_epoch != 1
        or trainer.val_check_interval != 1.0
        or (getattr(trainer, "_val_check_time_interval", None) is not None)
    ):
        problems.append(
            f"validation runs with check_val_every_n_epoch={trainer.check_val_every_n_epoch}, "
            f"val_check_interval={trainer.val_check_interval}: the recipe decides after each epoch, so it needs "
            "one validation at the end of every epoch (check_val_every_n_epoch=1, val_check_interval=1.0)"
        )
    if len(trainer.optimizers) > 1:
        problems.append(
            f"configure_optimizers returned {len(trainer.optimizers)} optimizers; the recipe trains with one per "
            "stage, made from the stage's groups: return one (it is replaced)"
        )
    min_steps = trainer.fit_loop.epoch_loop.min_steps
    if (trainer.fit_loop.min_epochs or 0) > 1 or (min_steps or 0) > 0:
        problems.append(
            f"min_epochs={trainer.fit_loop.min_epochs}, min_steps={min_steps} would keep training after the recipe "
            "ends; leave them unset"
        )
    if problems:
        raise ConfigError(problems)


def _submodule(pl_module: pl.LightningModule, path: str | None) -> nn.Module:
    if not path:
        return pl_module
    try:
        return pl_module.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in pl_module.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        top = ", ".join(n for n, _ in pl_module.named_children()) or "none"
        raise ConfigError(
            f"model={path!r} names no module of {type(pl_module).__name__}{hint}; its attributes that are "
            f"modules: {top}"
        ) from None


def _example(example_batch: Batch | None, pl_module: pl.LightningModule) -> Batch | None:
    batch = example_batch if example_batch is not None else pl_module.example_input_array
    if isinstance(batch, (tuple, list)):
        if len(batch) != 1:
            raise ConfigError(
                f"example_input_array holds {len(batch)} positional inputs; frostline maps a model from one tensor "
                "or a mapping of keyword tensors: pass FrostlineRecipe(example_batch=...)"
            )
        batch = batch[0]
    return batch


def _steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in an epoch, from the training loader's length and accumulate_grad_batches."""
    if trainer.train_dataloader is None:
        # what Trainer.estimated_stepping_batches does: load the training data now
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches < 1:
        raise ConfigError(
            f"the training loader has {batches} batches per epoch; each stage's schedule spans its epochs, so an "
            "epoch needs a known length: give the loader a length, or set limit_train_batches to an int"
        )
    return steps_per_epoch(int(batches), trainer.accumulate_grad_batches)
