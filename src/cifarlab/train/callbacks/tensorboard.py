"""TensorBoard event files (``--tensorboard``; needs the optional ``tensorboard`` package)."""
from __future__ import annotations

from pathlib import Path

from ..loop import Callback

SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s")


class TensorBoard(Callback):
    def __init__(self, folder: Path, log=print):
        self.folder, self.log, self.writer = folder, log, None

    def fit_start(self, t) -> None:
        if not t.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("--tensorboard needs the 'tensorboard' package (pip install 'cifarlab[tensorboard]'); skipping")
            return
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def epoch_end(self, t) -> None:
        if self.writer is None:
            return
        for key in SCALARS:
            if key in t.row:
                self.writer.add_scalar(key.replace("_", "/", 1), t.row[key], t.row["epoch"])
        self.writer.flush()

    def fit_end(self, t) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
