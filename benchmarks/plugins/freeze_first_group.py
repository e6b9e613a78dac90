"""Experiment (RESULTS.md, session 15; not adopted): FreezeOut for airnet's input end.

From step `FREEZE_AT` x steps_per_epoch on, the whitening conv and the first `FREEZE_GROUPS` conv groups stop
training (BatchNorm keeps using batch statistics): their backward pass is no longer computed, which saves about
a fifth of a full-size step. Use: CIFARLAB_PLUGINS=benchmarks/plugins/freeze_first_group.py FREEZE_AT=1.5
python benchmarks/time_to_accuracy.py --recipe fast --set callbacks=freeze_first_group ...
"""

from __future__ import annotations

import os
from typing import Any

from cifarlab.registry import CALLBACKS
from cifarlab.train.callbacks import Callback

AT = float(os.environ.get("FREEZE_AT", "1.0"))
GROUPS = int(os.environ.get("FREEZE_GROUPS", "1"))


class FreezeFirstGroup(Callback):
    def __init__(self) -> None:
        self.done = False

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        t = self.trainer
        if not self.done and t.step >= AT * t.steps_per_epoch:
            t.model.whiten.requires_grad_(False)
            for group in list(t.model.groups)[:GROUPS]:
                group.requires_grad_(False)
            self.done = True


@CALLBACKS.register("freeze_first_group")
def freeze_first_group(recipe: Any) -> FreezeFirstGroup:
    return FreezeFirstGroup()
