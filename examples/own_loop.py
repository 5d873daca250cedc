"""Your own training loop over frostline's recipe: MiniLM on BBC News, head first, then the last two blocks.

Every stage decision comes from frostline's stage engine (`Recipe`): what each stage freezes, its parameter groups
and their rates, the set-up lint, the guard that proves frozen tensors never moved, the overfitting verdict after each
epoch, which weights to keep and when to stop. The loop itself (batches, forward, backward, step) is yours.

    python examples/own_loop.py                       # the whole data set (a few minutes on 2 cores)
    python examples/own_loop.py --limit 300 --max-length 32
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from frostline import (
    DataConfig,
    Recipe,
    StageConfig,
    ValidationExamples,
    examples_from_logits,
    inspect_model,
    load_model,
)
from frostline.batches import TensorBatches
from frostline.checkpoint import model_tensors
from frostline.dataset import prepare_data
from frostline.sources.models import open_tokenizer


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: TensorBatches) -> ValidationExamples:
    """Each validation example's loss and correctness: the monitor measures every change against their noise."""
    model.eval()
    parts = [examples_from_logits(model(**batch), target) for batch, target in batches]
    return ValidationExamples(torch.cat([p.losses for p in parts]), torch.cat([p.correct for p in parts]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="use only this many articles")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    # data: BBC News topics, the stratified split `frostline fit --seed N` uses, tokenized once
    data = prepare_data(DataConfig(max_length=args.max_length, limit=args.limit), open_tokenizer("hf:minilm"), args.seed)
    train = data.train_batches(16, seed=args.seed)
    val = data.val_batches(64)

    model, example = load_model("hf:minilm", num_classes=len(data.label_names))
    model_map = inspect_model(model, example)
    recipe = Recipe(
        [
            StageConfig(name="head", freeze="head", epochs=4, lr=1e-2),
            StageConfig(
                name="last2", freeze="last:2", epochs=2, lr=5e-5, head_lr_mult=10, layer_decay=0.8, warmup=0.1
            ),
        ],
        patience=2,
    )
    recipe.check(model, model_map)  # every stage's spec names something in this model, before any training

    history, best, decision = [], None, None
    for index in range(len(recipe.stages)):
        stage = recipe.start(index, model, model_map, history)  # freezes; fresh groups with their rates
        print(stage.plan.summary())
        optimizer = torch.optim.AdamW(stage.groups)
        schedule = stage.schedule(optimizer, steps_per_epoch=len(train))
        for finding in stage.attach(optimizer):  # the set-up lint; frozen tensors fingerprinted
            print(finding)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for _ in range(stage.config.epochs):
            model.train()  # frozen entries stay in eval: freeze() holds them
            total, seen = 0.0, 0
            for batch, target in train:
                loss = F.cross_entropy(model(**batch), target)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                schedule.step()
                total, seen = total + loss.item() * len(target), seen + len(target)
            examples = evaluate(model, val)
            val_loss, val_accuracy = examples.losses.double().mean().item(), examples.correct.double().mean().item()
            history.append(stage.record(history, total / seen, val_loss, val_accuracy, examples))
            decision = recipe.decide(history, stage)  # the verdict, best weights?, stage or run over?
            record = history[-1]
            print(
                f"epoch {record.epoch} {record.stage}: train loss {record.train_loss:.4f}  val loss {val_loss:.4f}  "
                f"val acc {100 * val_accuracy:.2f}%{'  best' if decision.best else ''}"
            )
            if decision.diagnosis.message:
                print(decision.diagnosis.message)
            if decision.note:  # a `when: needed` stage next: whether it runs, and why
                print(decision.note)
            if decision.best:
                best = model_tensors(model)
            if decision.end_stage:
                break
        print(stage.finish().summary())  # raises FrozenWeightsChanged if a frozen tensor moved
        if decision is not None and decision.end_run:
            break
    model.load_state_dict(best)
    kept = [r for r in history if r.best][-1]
    print(f"kept epoch {kept.epoch} ({kept.stage}): {100 * kept.val_accuracy:.2f}%; {decision.stop_reason or 'every stage done'}")
    return {"history": history, "model": model, "decision": decision}


if __name__ == "__main__":
    main()
