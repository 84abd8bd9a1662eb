"""``metrics.csv``: one row per epoch, rewritten whole and atomically from the history kept in the
checkpoint, so a resumed run never has a duplicate or a missing row."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ...fsutil import atomic_write_text
from ..loop import Callback

CSV_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s"]


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


class MetricsCSV(Callback):
    def __init__(self, path: Path):
        self.path = path

    def epoch_end(self, t) -> None:
        if t.dist.is_main:
            write_metrics_csv(self.path, t.history)
