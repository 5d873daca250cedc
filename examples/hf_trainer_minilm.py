"""frostline's default recipe inside `transformers.Trainer`: MiniLM on BBC News, on the split `frostline fit` uses.

The callback makes every stage decision through frostline's stage engine (freeze, fresh groups and rates per stage,
lint, guard, the overfitting verdict, best weights); the Trainer runs the epochs.

    python examples/hf_trainer_minilm.py                          # the whole split, the default recipe
    python examples/hf_trainer_minilm.py --limit 200 --max-length 32 --epochs 1,1
    torchrun --standalone --nproc-per-node 2 examples/hf_trainer_minilm.py --limit 200 --max-length 32 --epochs 1,1

Under torchrun each process trains on its share of every step (the Trainer's DistributedDataParallel; the batch size
is per process) and the first process prints the result.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from frostline import FitConfig, load_model
from frostline.config import apply_overrides
from frostline.dataset import prepare_data
from frostline.integrations.transformers import FrostlineCallback
from frostline.sources.models import open_tokenizer


class Examples(torch.utils.data.Dataset):
    """Tokenized texts and labels as the dicts `transformers.Trainer` collates."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.inputs.items()}, "labels": self.labels[i]}


class WithLoss(torch.nn.Module):
    """A classifier that returns logits, as `transformers.Trainer` expects a model: it takes the labels and returns
    {"loss", "logits"}."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        logits = self.model(input_ids, attention_mask, token_type_ids)
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="use only this many articles")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", default=None, help="epochs per stage, e.g. 8,3 (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    overrides = [f"data.max_length={args.max_length}", f"data.limit={args.limit if args.limit else 'null'}"]
    if args.epochs:
        overrides += [f"stages.{i}.epochs={epochs}" for i, epochs in enumerate(args.epochs.split(","))]
    config = apply_overrides(FitConfig(), overrides)  # checked like `frostline fit --set ...`
    tokenizer = open_tokenizer(config.model.ref)
    data = prepare_data(config.data, tokenizer, args.seed)  # the same split as `frostline fit --seed N`
    torch.manual_seed(args.seed)
    classifier, _ = load_model(config.model.ref, num_classes=len(data.label_names))
    model = WithLoss(classifier)

    callback = FrostlineCallback(config.stages, patience=config.run.patience)
    with tempfile.TemporaryDirectory() as output:
        training = TrainingArguments(
            output_dir=output,
            eval_strategy="epoch",
            save_strategy="no",
            num_train_epochs=callback.epochs,
            per_device_train_batch_size=config.data.batch_size,
            per_device_eval_batch_size=config.data.eval_batch_size,
            max_grad_norm=config.run.clip_grad,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            seed=args.seed,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=Examples(data.train_inputs, data.train_labels),
            eval_dataset=Examples(data.val_inputs, data.val_labels),
            compute_metrics=callback.compute_metrics,
            callbacks=[callback],
            optimizers=callback.optimizers(),
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    best = max((r for r in callback.history if r.best), key=lambda r: r.epoch)
    summary = {
        "val_accuracy": best.val_accuracy,
        "best_epoch": best.epoch,
        "best_stage": best.stage,
        "epochs": len(callback.history),
        "seconds": round(seconds, 1),
        "stop_reason": callback.stop_reason,
    }
    if trainer.is_world_process_zero():
        for record in callback.history:
            print(
                f"epoch {record.epoch} {record.stage}: train loss {record.train_loss:.4f}  "
                f"val loss {record.val_loss:.4f}  val acc {100 * record.val_accuracy:.2f}%{'  best' if record.best else ''}"
            )
        print(json.dumps(summary))
    return {**summary, "history": callback.history, "model": model}


if __name__ == "__main__":
    main()
