"""Several processes, one recipe: PyTorch's own engine (torch.distributed, DistributedDataParallel) under torchrun.

`torchrun --nproc-per-node N -m frostline fit ...` (or `frostline fit --nproc N`) starts N processes that each run the
same `Trainer`; the process group comes from torchrun's environment (gloo on CPUs, NCCL on GPUs). What changes:

- `data.batch_size` is per process. Every process draws the same global batch of B x N examples (the order a single
  process with batch B x N would see) and trains on its own contiguous shard of it. Each shard's mean loss is weighted
  by its share of the global batch, so DDP's average of the processes' gradients is exactly the gradient of the
  global batch's mean loss, the last (smaller) batch too.
- DDP is built for each stage after its freeze, over the modules the stage runs (the whole model, or the cached
  tail): it registers only tensors that require grad, so frozen ones never reach its reducer, and trainable tensors
  of modules the forward pass never runs are left out by name, so no `find_unused_parameters` search is needed.
- The feature cache: each process runs the frozen part on its 1/N of the examples, and the outputs are gathered, so
  every process holds them all (the frozen part runs once per example, not once per process).
- Validation: each process evaluates 1/N of the examples and every per-example result is gathered in order, so every
  process records the same history and the stage engine makes the same decisions in each; training loss and accuracy
  are summed over the processes.
- Only rank 0 writes files (`is_main_process`); every other rank writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from frostline.batches import Batch, TensorBatches, batch_len, take, trim_padding
from frostline.errors import ConfigError, FrostlineError


@dataclass(frozen=True)
class Group:
    """This process's place among the processes of a run."""

    rank: int
    world: int
    local_rank: int
    backend: str

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous part [lo, hi) of n items; parts differ in size by at most one."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world


def world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def join(device: str) -> tuple[Group | None, bool]:
    """Join the process group that torchrun's environment describes, when it starts more than one process.

    Returns:
        The group (None for a single process) and whether this call created it (then `leave` ends it).

    Raises:
        ConfigError: the environment names several processes but not how to reach them.
    """
    if world_size() <= 1:
        return None, False
    if dist.is_initialized():
        return current(), False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start several processes with "
            "torchrun --nproc-per-node N -m frostline fit ... (or frostline fit --nproc N)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and not device.startswith("mps") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return current(), True


def current() -> Group | None:
    """The process group this process belongs to, or None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


def leave(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: Any, group: Group | None) -> Any:
    """Rank 0's `value` on every rank (a decision one process makes for all: the precision, say)."""
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over(values: list[float], group: Group | None) -> list[float]:
    """Each value summed over the processes."""
    if group is None:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_device(group))
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def gather(value: Any, group: Group | None) -> Any:
    """The ranks' parts (tensors, or dicts of tensors, split along the first dimension) joined in rank order."""
    if group is None:
        return value
    if isinstance(value, dict):
        return {k: gather(v, group) for k, v in value.items()}
    if value.dtype == torch.bool:
        # not every backend gathers bool tensors
        return gather(value.to(torch.uint8), group).bool()
    device = _device(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(group.world)]
    dist.all_gather(sizes, torch.tensor([len(value)], device=device))
    counts = [int(s.item()) for s in sizes]
    widest = max(counts)
    padded = value.new_zeros((widest, *value.shape[1:]))
    padded[: len(value)] = value
    padded = padded.to(device)
    parts = [torch.empty_like(padded) for _ in range(group.world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count].to(value.device) for part, count in zip(parts, counts, strict=True)])


class FailedElsewhere(ValueError):
    """Another process could not make its part of the feature cache; every process trains without it."""


def gather_agreed(outputs: dict[str, Any] | None, group: Group) -> dict[str, Any]:
    """Join the processes' parts of several named feature sets, after agreeing on which every process made.

    Every process calls this once per cache pass, also one whose pass failed (`outputs` None): the processes then
    make the same number of gathers in the same order, or none.

    Raises:
        FailedElsewhere: some process's pass failed (the others learn it here).
    """
    made: list[Any] = [None] * group.world
    dist.all_gather_object(made, sorted(outputs) if outputs is not None else None)
    if outputs is None:
        return {}
    if any(keys is None for keys in made):
        raise FailedElsewhere("another process could not cache its share of the examples")
    common = [k for k in made[0] if all(k in keys for keys in made)]
    return {k: gather(outputs[k], group) for k in common}


def _device(group: Group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if group.backend == "nccl" else torch.device("cpu")


def shard_inputs(inputs: Batch, group: Group | None) -> Batch:
    """This rank's contiguous part of a set of examples."""
    if group is None:
        return inputs
    lo, hi = group.shard(batch_len(inputs))
    return take(inputs, slice(lo, hi))


def shard_batches(batches: TensorBatches, group: Group | None) -> TensorBatches:
    """Validation batches over this rank's contiguous part of the examples (unshuffled)."""
    if group is None:
        return batches
    lo, hi = group.shard(len(batches.labels))
    return TensorBatches(
        shard_inputs(batches.inputs, group), batches.labels[lo:hi], batches.batch_size, transform=batches.transform
    )


class ShardedBatches:
    """Global batches of B x N examples, in the order one process would see them, each cut to this rank's shard.

    Yields (inputs, labels, weight): `weight` scales the shard's mean loss so that the average over the processes is
    the global batch's mean loss: N x the shard's share of the batch's examples, or with class weights (a loss that
    divides by the sum of its examples' class weights) of that sum. A rank whose shard is empty (a last batch with
    fewer examples than processes) gets one example at weight 0: it must still join the gradient all-reduce.
    """

    def __init__(self, batches: TensorBatches, group: Group, class_weight: torch.Tensor | None = None):
        self.batches = batches
        self.group = group
        self.class_weight = class_weight

    @property
    def generator(self) -> torch.Generator:
        return self.batches.generator

    @property
    def batch_size(self) -> int:
        return self.batches.batch_size

    @property
    def seed(self) -> int:
        return self.batches.seed

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Batch, torch.Tensor, float]]:
        world = self.group.world
        for inputs, labels in self.batches:
            n = len(labels)
            lo, hi = self.group.shard(n)
            if self.class_weight is None:
                weight = (hi - lo) * world / n
            else:
                each = self.class_weight[labels]
                weight = float(world * each[lo:hi].sum() / each.sum())
            if hi == lo:
                lo, hi = 0, 1
            yield trim_padding(take(inputs, slice(lo, hi))), labels[lo:hi], weight


class _StageForward(nn.Module):
    """The modules a stage runs, as one module whose forward is the stage's forward function (for DDP to wrap)."""

    def __init__(self, modules: list[nn.Module], forward: Callable[[Batch], torch.Tensor]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.function = forward

    def forward(self, inputs: Batch) -> torch.Tensor:
        return self.function(inputs)


def data_parallel(
    forward: Callable[[Batch], torch.Tensor],
    modules: list[nn.Module],
    model: nn.Module,
    ran: set[str],
    group: Group | None,
) -> tuple[Callable[[Batch], torch.Tensor], Unsynced | None]:
    """The stage's forward function under DistributedDataParallel (unchanged for a single process), and the watch on
    the trainable tensors it leaves out (None for a single process).

    Args:
        forward: the stage's forward function over `modules`.
        modules: the modules it runs (parts of `model`), wrapped together.
        model: the whole model, to name the modules.
        ran: paths of the modules that ran in the model map's example forward pass.
    """
    if group is None:
        return forward, None
    from torch.nn.parallel import DistributedDataParallel

    wrapper = _StageForward(modules, forward)
    inside = {id(p) for p in wrapper.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        # DDP would never sync their gradients, and the processes' copies would drift apart
        raise FrostlineError(
            f"{len(outside)} trainable tensors ({', '.join(outside[:3])}) lie outside the modules this stage runs; "
            "several processes cannot train them: run.cache=off runs the whole model"
        )
    ignored = never_run(wrapper, model, ran)
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, ignored)
    device_ids = [torch.cuda.current_device()] if group.backend == "nccl" else None
    unsynced = Unsynced(wrapper, ignored, "freeze them (a freeze spec that leaves them out), or run one process")
    return DistributedDataParallel(wrapper, device_ids=device_ids), unsynced


class Unsynced:
    """Watches the trainable tensors DDP was told to leave out because the map's example forward (in eval mode) never
    ran their modules. One that gets a gradient in training (a branch that runs only in training: an auxiliary head,
    say) trains in each process on its own, out of sync with the others."""

    def __init__(self, root: nn.Module, names: list[str], fix: str):
        self.names = list(names)
        self.fix = fix
        self.hit: set[str] = set()
        self._handles = [root.get_parameter(name).register_hook(self._record(name)) for name in self.names]

    def _record(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            self.hit.add(name)
            return grad

        return hook

    def check(self, group: Group | None) -> None:
        """Every process together: raise when any of them saw a left-out tensor get a gradient.

        Raises:
            FrostlineError: naming the tensors (in every process, so none waits for the others).
        """
        if group is None or not self.names:
            return
        hit = sorted(self.hit)
        if sum_over([float(len(hit))], group)[0]:
            self.remove()
            raise FrostlineError(
                f"{', '.join(hit[:3]) or 'tensors in another process'}: trainable tensors whose modules never ran in "
                "the model map's example forward (eval mode), so DDP leaves them out, got gradients in training (a "
                f"branch that runs only in training); each process would train them on its own: {self.fix}"
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def never_run(root: nn.Module, model: nn.Module, ran: set[str]) -> list[str]:
    """Names, as `root` (the module DDP wraps) calls them, of `model`'s trainable tensors whose modules the map's
    forward pass never ran: they get no gradient, so DDP must be told to leave them out rather than wait for one.

    Args:
        root: the module DDP wraps; it holds `model` (or parts of it).
        model: the model the map describes.
        ran: paths of the modules that ran in the map's example forward pass (`ModelMap.call_order`).
    """
    paths = {module: path for path, module in model.named_modules()}
    return [
        f"{owner}.{name}" if owner else name
        for owner, module in root.named_modules()
        if module in paths and paths[module] not in ran
        for name, param in module.named_parameters(recurse=False)
        if param.requires_grad
    ]


def first_on_rank0(read: Callable[[], Any], group: Group | None) -> Any:
    """`read()` on rank 0, then on the other ranks: a read that repairs a file (a write a kill cut short) happens in
    the one process that writes, and the others read the repaired file."""
    if group is None:
        return read()
    if group.rank == 0:
        value = read()
        dist.barrier()
        return value
    dist.barrier()
    return read()


def seed_rank(seed: int, group: Group | None) -> None:
    """Rank r > 0 draws its own random numbers (dropout masks) from here on; rank 0 keeps the run's generator."""
    if group is not None and group.rank > 0:
        torch.manual_seed(seed + 7919 * group.rank)


def broadcast_buffers(model: nn.Module, group: Group | None) -> None:
    """Rank 0's buffers (BatchNorm running statistics) in every process, as DDP does before each training forward:
    each process's last step updated its own, and validation must read one model's."""
    if group is None:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.broadcast(buffer.data, src=0)


def sync_batchnorm(model: nn.Module, group: Group | None, device: torch.device) -> tuple[nn.Module, str | None]:
    """BatchNorm for several processes: on GPUs every BatchNorm becomes SyncBatchNorm, so one that trains normalises
    with the whole global batch's statistics (one held in eval mode by the freeze, or by bn=fixed, reads its running
    statistics as before and never syncs); on CPUs (no SyncBatchNorm there) each process normalises with its own
    shard's, and the note says so."""
    if group is None or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model, None
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), "BatchNorm: SyncBatchNorm across the processes"
    return model, (
        "BatchNorm: a BatchNorm that trains in batch-statistics mode normalises with each process's own shard here "
        "(SyncBatchNorm needs GPUs); bn=fixed keeps every BatchNorm on its running statistics instead"
    )
