"""frostline's recipe inside a Lightning `Trainer`: EfficientNet-Lite0 on MNIST-5k, on the split `frostline fit` uses.

The callback makes every stage decision through frostline's stage engine (freeze, fresh groups and rates per stage,
lint, guard, the overfitting verdict, best weights); Lightning runs the epochs. The data, split, image size and
normalisation are those of `frostline fit examples/mnist-efficientnet.yaml` (same seed, same validation images);
unlike `frostline fit`, every epoch runs the whole network, since Lightning has no feature cache for the head stage.

    python examples/lightning_efficientnet_mnist.py                      # the whole split, the config's recipe
    python examples/lightning_efficientnet_mnist.py --limit 300 --image-size 32 --epochs 1,1 --threads 1
    python examples/lightning_efficientnet_mnist.py --limit 300 --image-size 32 --epochs 1,1 --threads 1 --devices 2

With `--devices N` Lightning's DDP runs N processes (the script starts the others); the batch size is per process,
Lightning's sampler gives each process its share of every epoch, and the first process prints the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from frostline import FitConfig, load_config, load_model
from frostline.dataset import PreparedData, Transform, prepare_data
from frostline.integrations.lightning import FrostlineRecipe
from frostline.sources.models import open_preprocess

CONFIG = Path(__file__).resolve().parent / "mnist-efficientnet.yaml"


class Indices(Dataset):
    """Positions 0..n-1: the loader picks which examples form a batch, `Gather` fetches and transforms them."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class Gather:
    """Collate: the uint8 images and labels at a batch's positions, transformed as one batch (scale, normalise)."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Transform | None, generator: torch.Generator
    ):
        self.images, self.labels, self.transform, self.generator = images, labels, transform, generator

    def __call__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(positions)
        images = self.images[index]
        if self.transform is not None:
            # augmentation, when configured, draws from the loader's generator: a seeded run repeats exactly
            images = self.transform(images, self.generator)
        return images, self.labels[index]


def loaders(data: PreparedData, config: FitConfig, seed: int) -> tuple[DataLoader, DataLoader]:
    """Training (shuffled, seeded) and validation loaders over the prepared split, batch sizes from `config.data`."""
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(
        Indices(len(data.train_labels)),
        batch_size=config.data.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=Gather(data.train_inputs, data.train_labels, data.train_transform, generator),
    )
    val = DataLoader(
        Indices(len(data.val_labels)),
        batch_size=config.data.eval_batch_size,
        collate_fn=Gather(data.val_inputs, data.val_labels, data.val_transform, generator),
    )
    return train, val


class Classifier(L.LightningModule):
    """A LightningModule around a pretrained classifier, as the recipe needs it: the model in `net`, the loss
    returned from `training_step`, `val_loss` and `val_accuracy` logged per epoch."""

    def __init__(self, net: torch.nn.Module, example: torch.Tensor, recipe: FrostlineRecipe | None = None):
        super().__init__()
        self.net = net
        self.recipe = recipe
        # the recipe maps the model by running this input through it (forward order)
        self.example_input_array = example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x).float(), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x).float()
        # weighted by batch size, so a short last batch counts as much as its examples; averaged over the processes
        self.log("val_loss", F.cross_entropy(logits, y), batch_size=len(y), sync_dist=True)
        self.log("val_accuracy", (logits.argmax(-1) == y).float().mean(), batch_size=len(y), sync_dist=True)
        if self.recipe is not None:
            self.recipe.record_validation(logits, y)  # the monitor then knows each example: paired comparisons

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # Lightning requires one; FrostlineRecipe replaces it


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG), help="a frostline config file (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="use only this many images (split as frostline fit)")
    parser.add_argument("--image-size", type=int, default=None, help="pixels per side (default: the config's)")
    parser.add_argument("--epochs", default=None, help="epochs per stage, e.g. 8,3 (default: the config's)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the config's run.seed)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: run.threads)")
    parser.add_argument("--devices", type=int, default=1, help="processes, one per device, under DDP (default: 1)")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    seed = config.run.seed if args.seed is None else args.seed
    # replace, not assign: the dataclasses check the new values
    config.data = dataclasses.replace(
        config.data,
        limit=args.limit if args.limit is not None else config.data.limit,
        image_size=args.image_size or config.data.image_size,
    )
    if args.epochs:
        epochs = [int(e) for e in args.epochs.split(",")]
        if len(epochs) != len(config.stages):
            parser.error(f"--epochs gives {len(epochs)} numbers for {len(config.stages)} stages, got {args.epochs}")
        config.stages = [dataclasses.replace(s, epochs=e) for s, e in zip(config.stages, epochs, strict=True)]
    threads = args.threads or config.run.threads
    if threads:
        # on a shared machine, more threads than free cores wait on each other (the fit was 50x slower on 2 busy cores)
        torch.set_num_threads(threads)

    preprocess = open_preprocess(config.model.ref)
    data = prepare_data(config.data, None, seed, preprocess=preprocess)  # the same split as `frostline fit --seed N`
    L.seed_everything(seed, verbose=False)  # the new head's initialisation, as frostline fit seeds it
    net, _ = load_model(config.model.ref, num_classes=len(data.label_names))
    example = data.val_transform(data.val_inputs[:2], None)  # two real inputs at the run's image size
    recipe = FrostlineRecipe(config.stages, patience=config.run.patience, min_delta=config.run.min_delta, model="net")
    module = Classifier(net, example, recipe)
    train_loader, val_loader = loaders(data, config, seed)

    cuda = torch.cuda.is_available()
    trainer = L.Trainer(
        accelerator="cuda" if cuda else "cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        # bf16 autocast where the GPU has it, as frostline fit's precision=auto (fp32 on CPU)
        precision="bf16-mixed" if cuda and torch.cuda.is_bf16_supported() else "32-true",
        max_epochs=recipe.epochs,
        gradient_clip_val=config.run.clip_grad,
        accumulate_grad_batches=config.run.grad_accum,
        callbacks=[recipe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # some CUDA kernels have no deterministic version: warn there rather than fail
        deterministic=True if not cuda else "warn",
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    seconds = time.perf_counter() - start

    best = next(r for r in recipe.history if r.epoch == recipe.best_epoch)
    summary = {
        "val_accuracy": best.val_accuracy,
        "best_epoch": best.epoch,
        "best_stage": best.stage,
        "epochs": len(recipe.history),
        "seconds": round(seconds, 1),
        "stop_reason": recipe.stop_reason,
    }
    if trainer.is_global_zero:
        for record in recipe.history:
            print(
                f"epoch {record.epoch} {record.stage}: train loss {record.train_loss:.4f}  "
                f"val loss {record.val_loss:.4f}  val acc {100 * record.val_accuracy:.2f}%{'  best' if record.best else ''}"
            )
        print(json.dumps(summary))
    return {**summary, "history": recipe.history, "model": net, "guard_reports": recipe.guard_reports}


if __name__ == "__main__":
    main()
