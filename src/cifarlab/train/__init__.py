"""Training: the loop (`loop`), optimizers and LR schedules (`optim`), callbacks (`callbacks`: the hook API and
Keras' EarlyStopping/ReduceLROnPlateau), the recipe's techniques (`techniques`: EMA, whitening-bias freeze),
the run's files (`checkpoint`), what a person sees (`progress`, `table`) and trackers (`loggers`)."""

from cifarlab.train.callbacks import Callback, CallbackList, EarlyStopping, ReduceLROnPlateau
from cifarlab.train.checkpoint import Checkpoint, StepLog, write_history
from cifarlab.train.loggers import MLflowLogger, TensorBoardLogger
from cifarlab.train.loop import FitResult, History, NaNGuard, Trainer, TrainingDiverged, all_finite
from cifarlab.train.optim import StepSchedule, build_optimizer, lr_multiplier
from cifarlab.train.progress import EpochLog, ProgressBar
from cifarlab.train.table import describe_events, format_epoch_line, format_history_table
from cifarlab.train.techniques import Lookahead, WhitenBiasFreeze, recipe_callbacks

__all__ = [
    "Callback",
    "CallbackList",
    "Checkpoint",
    "EarlyStopping",
    "EpochLog",
    "FitResult",
    "History",
    "Lookahead",
    "MLflowLogger",
    "NaNGuard",
    "ProgressBar",
    "ReduceLROnPlateau",
    "StepLog",
    "StepSchedule",
    "TensorBoardLogger",
    "Trainer",
    "TrainingDiverged",
    "WhitenBiasFreeze",
    "all_finite",
    "build_optimizer",
    "describe_events",
    "format_epoch_line",
    "format_history_table",
    "lr_multiplier",
    "recipe_callbacks",
    "write_history",
]
