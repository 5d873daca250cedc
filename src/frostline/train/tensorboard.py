"""Each epoch's numbers as TensorBoard scalars in RUN/tensorboard, when the tensorboard package is installed.

metrics.jsonl stays the record; this is a view of it for people who watch runs in TensorBoard.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from frostline.recipe import EpochRecord


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """Scalars per epoch (x axis: the epoch, counted across stages), in RUN/tensorboard."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))

    def epoch(self, record: EpochRecord) -> None:
        step = record.epoch
        scalars = {
            "loss/train": record.train_loss,
            "loss/validation": record.val_loss,
            "accuracy/validation": record.val_accuracy,
            "accuracy/train": record.train_accuracy,
            "macro_f1/validation": record.val_macro_f1,
            "time/train_seconds": record.train_seconds,
            "trainable/parameters": record.trainable_params,
        }
        for name, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)
        for group, rate in record.lr.items():
            self.writer.add_scalar(f"lr/{group}", rate, step)
        self.writer.add_text("stage", f"epoch {record.epoch}: stage {record.stage} ({record.freeze})", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
