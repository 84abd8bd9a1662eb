"""The training doctor's reading of the curves at the end of training (see :mod:`cifarlab.doctor`): printed,
and stored in the final checkpoint's meta for the report."""
from __future__ import annotations

from ...doctor import diagnose, format_diagnosis
from ..loop import Callback


class Diagnose(Callback):
    order = 85  # after early stopping's restore note, before the final checkpoint is written

    def __init__(self, val_source: str, mixed_batches: bool, log=print):
        self.val_source, self.mixed_batches, self.log = val_source, mixed_batches, log

    def fit_end(self, t) -> None:
        if not (t.dist.is_main and t.history and t.finished):
            return
        findings = diagnose(t.history, val_size=len(t.val_split), val_source=self.val_source,
                            mixed_batches=self.mixed_batches)
        self.log(format_diagnosis(findings))
        t.final_meta["diagnosis"] = [f.to_dict() for f in findings]
