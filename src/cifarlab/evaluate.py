"""Evaluation of a classifier's predictions: scikit-learn metrics, confusion ranking, calibration.

`evaluate_predictions` works on plain arrays (labels and logits) so it can be tested on hand-made cases;
`evaluate_run` loads a saved run, predicts the chosen split in eval mode and hands the logits to it.
The result is a frozen `EvalResult` (typed fields, numpy confusion matrices); its `to_dict()` is the
JSON-serialisable form written to `eval_<split>.json` and into `metrics.json` under "evaluation".
"""

from __future__ import annotations

import os
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.errors import UserError
from cifarlab.text import terminal_safe

__all__ = [
    "HIGH_CONFIDENCE",
    "TOP_CONFUSIONS",
    "Calibration",
    "CalibrationBin",
    "ClassMetrics",
    "ConfusedPair",
    "DatasetCheck",
    "EvalResult",
    "HighConfidence",
    "InferenceInfo",
    "Predictions",
    "ProbabilityCheck",
    "TrainingState",
    "calibration",
    "check_dataset",
    "confused_pairs",
    "cross_entropy",
    "dataset_warning",
    "evaluate_predictions",
    "evaluate_run",
    "format_summary",
    "load_run_dataset",
    "load_test_data",
    "resolve_test_data",
    "softmax",
    "split_images",
    "top_confusion_counts",
    "top_confusions",
]

TOP_CONFUSIONS = 3  # confusions listed per class ("cat -> dog 14%, frog 6%, bird 5%")
HIGH_CONFIDENCE = 0.9


# -- the typed result ----------------------------------------------------------------------------------------


def _json_number(v: float) -> float | None:
    """NaN (not applicable) as JSON null: json.dumps would write NaN, which is not JSON."""
    return None if v != v else v


@dataclass(frozen=True)
class ClassMetrics:
    """Precision, recall, F1 and support of one class (or an average over the classes present).

    A class with no image in the evaluated labels (support 0) has NaN precision, recall and F1: not
    applicable, rather than a 0 that would read as a class the model fails on (JSON: null)."""

    precision: float
    recall: float
    f1: float
    support: int

    @property
    def applicable(self) -> bool:
        """False for a class absent from the evaluated labels (its scores are NaN)."""
        return self.support > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": _json_number(self.precision),
            "recall": _json_number(self.recall),
            "f1": _json_number(self.f1),
            "support": self.support,
        }


@dataclass(frozen=True)
class ConfusedPair:
    """Two classes mistaken for each other: `count` = `a_to_b` (a predicted as b) + `b_to_a`."""

    a: str
    b: str
    count: int
    a_to_b: int
    b_to_a: int

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "count": self.count, "a_to_b": self.a_to_b, "b_to_a": self.b_to_a}


@dataclass(frozen=True)
class CalibrationBin:
    """One equal-width confidence bin (lower, upper]; accuracy/confidence/gap are None for an empty bin."""

    lower: float
    upper: float
    count: int
    accuracy: float | None
    confidence: float | None
    gap: float | None  # mean confidence - accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "lower": self.lower,
            "upper": self.upper,
            "count": self.count,
            "accuracy": self.accuracy,
            "confidence": self.confidence,
            "gap": self.gap,
        }


@dataclass(frozen=True)
class HighConfidence:
    """Of the predictions made with confidence >= threshold (`share` of all), the share that is right."""

    threshold: float
    share: float
    accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "share": self.share, "accuracy": self.accuracy}


@dataclass(frozen=True)
class Calibration:
    """Expected/maximum calibration error and the reliability diagram's bins."""

    n_bins: int
    ece: float
    mce: float  # the worst bin's |confidence - accuracy|
    mean_confidence: float
    accuracy: float
    overconfidence: float  # mean confidence - accuracy; > 0: the model claims more than it delivers
    bins: tuple[CalibrationBin, ...]
    high_confidence: HighConfidence

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_bins": self.n_bins,
            "ece": self.ece,
            "mce": self.mce,
            "mean_confidence": self.mean_confidence,
            "accuracy": self.accuracy,
            "overconfidence": self.overconfidence,
            "bins": [b.to_dict() for b in self.bins],
            "high_confidence": self.high_confidence.to_dict(),
        }


@dataclass(frozen=True)
class ProbabilityCheck:
    """Whether the softmax output is a probability distribution (rows in [0, 1] summing to 1)."""

    min: float
    max: float
    max_abs_sum_error: float
    is_distribution: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "min": self.min,
            "max": self.max,
            "max_abs_sum_error": self.max_abs_sum_error,
            "is_distribution": self.is_distribution,
        }


@dataclass(frozen=True)
class DatasetCheck:
    """Which data was evaluated, and whether its checksum is the one the run was trained on.

    `checksum_matches_run` is None when either checksum is unknown (a plain folder has none)."""

    name: str
    source: str
    checksum: str
    checksum_matches_run: bool | None

    @property
    def mismatch(self) -> bool:
        """True when the data evaluated is known not to be the run's (checksums differ)."""
        return self.checksum_matches_run is False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "checksum": self.checksum,
            "checksum_matches_run": self.checksum_matches_run,
        }


@dataclass(frozen=True)
class InferenceInfo:
    """How the logits were computed, and how long it took."""

    device: str
    tta: str
    precision: str
    dtype: str  # what precision "auto" resolved to on this machine
    channels_last: bool
    batch_size: int
    predict_seconds: float | None  # None when the logits came from training
    images_per_second: float | None
    logits_from: str  # "training" or "this evaluation"
    metrics_seconds: float
    temperature: float = 1.0  # the run's softmax temperature, applied to every probability (`cifarlab.calibrate`)
    uncalibrated_ece: float | None = None  # the ECE of the plain softmax, when the temperature is not 1
    temperature_fitted_on: str | None = None  # e.g. "1000 validation images" (metrics.json "calibration")
    uncalibrated_loss: float | None = None  # the plain softmax's cross-entropy, when the temperature is not 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "tta": self.tta,
            "precision": self.precision,
            "dtype": self.dtype,
            "channels_last": self.channels_last,
            "batch_size": self.batch_size,
            "predict_seconds": self.predict_seconds,
            "images_per_second": self.images_per_second,
            "logits_from": self.logits_from,
            "metrics_seconds": self.metrics_seconds,
            "temperature": self.temperature,
            "uncalibrated_ece": self.uncalibrated_ece,
            "temperature_fitted_on": self.temperature_fitted_on,
            "uncalibrated_loss": self.uncalibrated_loss,
        }


@dataclass(frozen=True)
class TrainingState:
    """How the run's training ended, from its files (status.json, config.json, steps.csv), for the report's
    reading: a stopped run must not read like a finished one. Not part of the evaluation's JSON (the run's
    own files hold it)."""

    run_dir: str
    status: str | None  # status.json: "finished", "stopped" (Ctrl-C), "crashed", ...; None when absent
    planned_epochs: int | None  # the recipe's epochs
    calibrate: bool  # the recipe fits a softmax temperature after training
    last_epoch_steps: int | None = None  # optimizer steps logged in the last epoch (steps.csv), when known
    resume: str = ""  # the command that continues it (`runs.resume_command`); "" when not known

    @property
    def resume_command(self) -> str:
        return self.resume or f"cifarlab train --resume {self.run_dir}"


def _balanced_accuracy(score: Any, y: np.ndarray, pred: np.ndarray) -> float | None:
    """The mean recall over the classes present in `y` (None with one class): a test set holding a subset of the
    classes is fine, so scikit-learn's warning that the predictions name others is not for the user."""
    import warnings

    if len(set(y.tolist())) <= 1:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(score(y, pred))


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class EvalResult:
    """Every metric of one evaluation. `split`, `dataset` and `inference` are set by `evaluate_run`
    (None for `evaluate_predictions` on plain arrays)."""

    n: int
    classes: tuple[str, ...]
    loss: float  # mean cross-entropy
    accuracy: float
    error_rate: float
    balanced_accuracy: float | None  # None when only one class occurs
    top5: float  # top-`top_k` accuracy (JSON key: top5_accuracy)
    top_k: int  # min(5, number of classes)
    confusion: np.ndarray = field(compare=False)  # int counts, rows = true class, columns = predicted
    confusion_normalized: np.ndarray = field(compare=False)  # rows sum to 1 (empty rows: zeros)
    per_class: Mapping[str, ClassMetrics]
    macro_avg: ClassMetrics
    weighted_avg: ClassMetrics
    top_confusions: Mapping[str, tuple[tuple[str, float], ...]]  # class -> ((other, share of class), ...)
    confused_pairs: tuple[ConfusedPair, ...]
    calibration: Calibration
    probability_check: ProbabilityCheck
    split: str | None = None
    dataset: DatasetCheck | None = None
    inference: InferenceInfo | None = None
    training: TrainingState | None = field(default=None, compare=False)  # not in to_dict(): the run's files

    def __post_init__(self) -> None:
        # Frozen all the way down: read-only arrays and mappings.
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "confusion", _readonly(self.confusion))
        object.__setattr__(self, "confusion_normalized", _readonly(self.confusion_normalized))
        object.__setattr__(self, "per_class", types.MappingProxyType(dict(self.per_class)))
        tc = {k: tuple((str(o), float(s)) for o, s in v) for k, v in self.top_confusions.items()}
        object.__setattr__(self, "top_confusions", types.MappingProxyType(tc))
        object.__setattr__(self, "confused_pairs", tuple(self.confused_pairs))

    @property
    def split_name(self) -> str:
        """The split evaluated ("test" when not set)."""
        return self.split or "test"

    @property
    def tta(self) -> str | None:
        return self.inference.tta if self.inference else None

    @property
    def seconds(self) -> float | None:
        """Seconds the prediction took (None when the logits came from training or are not known)."""
        return self.inference.predict_seconds if self.inference else None

    @property
    def dataset_mismatch(self) -> bool:
        """True when the data evaluated is known not to be the data the run was trained on."""
        return self.dataset is not None and self.dataset.mismatch

    @property
    def present_classes(self) -> tuple[str, ...]:
        """The classes with at least one image in the evaluated labels (the others' scores are NaN)."""
        return tuple(c for c in self.classes if self.per_class[c].applicable)

    @property
    def top_k_informative(self) -> bool:
        """False when k >= the number of classes: every label is then among the top k, so top-k is 100%."""
        return self.top_k < len(self.classes)

    def with_run_info(
        self,
        split: str,
        dataset: DatasetCheck,
        inference: InferenceInfo,
        training: TrainingState | None = None,
    ) -> EvalResult:
        from dataclasses import replace

        return replace(self, split=split, dataset=dataset, inference=inference, training=training)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (eval_<split>.json, metrics.json["evaluation"]); keys in their historical order."""
        d: dict[str, Any] = {
            "n": self.n,
            "classes": list(self.classes),
            "loss": self.loss,
            "accuracy": self.accuracy,
            "error_rate": self.error_rate,
            "balanced_accuracy": self.balanced_accuracy,
            "top5_accuracy": self.top5,
            "top_k": self.top_k,
            "confusion_matrix": self.confusion.astype(int).tolist(),
            "confusion_matrix_normalized": self.confusion_normalized.astype(float).tolist(),
            "per_class": {name: m.to_dict() for name, m in self.per_class.items()},
            "macro_avg": self.macro_avg.to_dict(),
            "weighted_avg": self.weighted_avg.to_dict(),
            "top_confusions": {name: [[o, s] for o, s in v] for name, v in self.top_confusions.items()},
            "confused_pairs": [p.to_dict() for p in self.confused_pairs],
            "calibration": self.calibration.to_dict(),
            "probability_check": self.probability_check.to_dict(),
        }
        if self.split is not None:
            d["split"] = self.split
        if self.dataset is not None:
            d["dataset"] = self.dataset.to_dict()
        if self.inference is not None:
            d["inference"] = self.inference.to_dict()
        return d


@dataclass(frozen=True)
class Predictions:
    """The arrays behind an evaluation, for the report's figures: logits (divided by the run's softmax
    temperature, so that their softmax is `probs`), softmax probabilities, true and
    predicted labels, the images (uint8 tensor), their indices into the split's source array, the dataset
    and the loaded run."""

    logits: np.ndarray
    probs: np.ndarray
    y_true: np.ndarray
    y_pred: np.ndarray
    images: Any
    indices: np.ndarray
    dataset: Any
    run: Any


# -- metrics -----------------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (the reference model's output layer)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)  # shift for stability: exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(y_true: np.ndarray, logits: np.ndarray) -> float:
    """Mean cross-entropy from logits via log-softmax.

    Exact for any logit gap, unlike scikit-learn's `log_loss` on probabilities, which clips them at the
    float epsilon; it is the same number as training's `F.cross_entropy` (tests check it against `log_loss`).
    """
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    log_norm = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), y_true]))


def top_confusion_counts(
    cm: np.ndarray, classes: Sequence[str], k: int = TOP_CONFUSIONS
) -> dict[str, list[tuple[str, int]]]:
    """Each true class's `k` most frequent wrong predictions as (other class, images).

    Only confusions that happened are listed; ties go to the lower class index, so the ranking is stable.
    """
    out: dict[str, list[tuple[str, int]]] = {}
    for i, name in enumerate(classes):
        row = cm[i].astype(np.int64)
        others = [j for j in range(len(classes)) if j != i and row[j] > 0]
        others.sort(key=lambda j: (-int(row[j]), j))
        out[name] = [(classes[j], int(row[j])) for j in others[:k]]
    return out


def top_confusions(
    cm: np.ndarray, classes: Sequence[str], k: int = TOP_CONFUSIONS
) -> dict[str, list[tuple[str, float]]]:
    """`top_confusion_counts` as (other class, share of the true class's images)."""
    totals = cm.astype(np.int64).sum(axis=1)
    counts = top_confusion_counts(cm, classes, k)
    return {c: [(o, float(n / totals[i])) for o, n in counts[c]] for i, c in enumerate(classes)}


def confused_pairs(cm: np.ndarray, classes: Sequence[str], k: int = 10) -> list[ConfusedPair]:
    """The `k` class pairs mistaken for each other most often, both directions added up."""
    n = len(classes)
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            a_to_b, b_to_a = int(cm[i, j]), int(cm[j, i])
            if a_to_b + b_to_a:
                pairs.append(ConfusedPair(classes[i], classes[j], a_to_b + b_to_a, a_to_b, b_to_a))
    pairs.sort(key=lambda p: -p.count)  # stable sort: ties keep class order
    return pairs[:k]


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> Calibration:
    """Expected calibration error and the reliability diagram's bins (equal-width confidence bins).

    Bin m holds confidences in ((m-1)/M, m/M] (the first bin also holds 0), as in Guo et al. 2017.
    ECE = sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|. scikit-learn has no
    multi-class ECE (its `calibration_curve` is binary), so this one is written here, and tested by hand.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    n = len(conf)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    ok_sum = np.bincount(idx, weights=ok.astype(np.float64), minlength=n_bins)
    bins = []
    ece = mce = 0.0
    for m in range(n_bins):
        c = int(counts[m])
        acc = float(ok_sum[m] / c) if c else None
        mean_conf = float(conf_sum[m] / c) if c else None
        gap = (mean_conf - acc) if mean_conf is not None and acc is not None else None
        if gap is not None:
            ece += c / n * abs(gap)
            mce = max(mce, abs(gap))
        bins.append(CalibrationBin(m / n_bins, (m + 1) / n_bins, c, acc, mean_conf, gap))
    accuracy = float(ok.mean()) if n else 0.0
    mean_confidence = float(conf.mean()) if n else 0.0
    confident = conf >= HIGH_CONFIDENCE
    return Calibration(
        n_bins=n_bins,
        ece=float(ece),
        mce=float(mce),
        mean_confidence=mean_confidence,
        accuracy=accuracy,
        overconfidence=mean_confidence - accuracy,
        bins=tuple(bins),
        # "of the predictions made with >= 90% confidence, how many are right": the number a user acts on
        high_confidence=HighConfidence(
            threshold=HIGH_CONFIDENCE,
            share=float(confident.mean()) if n else 0.0,
            accuracy=float(ok[confident].mean()) if confident.any() else None,
        ),
    )


def evaluate_predictions(
    y_true: np.ndarray, logits: np.ndarray, classes: Sequence[str], n_bins: int = 15
) -> EvalResult:
    """All metrics of a classifier from its logits on labelled images, as an `EvalResult`.

    The confusion matrix has rows = true class, columns = predicted; per-class rows, macro and weighted
    averages come from scikit-learn (`zero_division=0`); calibration from `calibration`. A class absent from
    `y_true` gets NaN scores (not applicable), and the averages are over the classes present: counted as 0 it
    would drag the macro F1 of a perfect model below 1 and contradict the balanced accuracy.
    """
    # Here, not at the top: scikit-learn takes ~0.8 s to import, and `cifarlab.fit` imports this module for its
    # types long before a run is evaluated.
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    classes = list(classes)
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    z = np.asarray(logits, dtype=np.float64)
    k_cls = len(classes)
    if z.ndim != 2 or z.shape != (len(y), k_cls):
        raise ValueError(f"logits must be ({len(y)}, {k_cls}), got {z.shape}")
    if len(y) == 0:
        raise UserError("nothing to evaluate: the split has no images")
    if y.min() < 0 or y.max() >= k_cls:
        raise ValueError(f"labels must be in [0, {k_cls}), got [{y.min()}, {y.max()}]")
    labels = list(range(k_cls))
    probs = softmax(z)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)

    cm = confusion_matrix(y, pred, labels=labels)
    cm_norm = confusion_matrix(y, pred, labels=labels, normalize="true")  # empty rows come back as zeros
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    present = sorted(set(y.tolist()))
    averages = {}
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y, pred, labels=present, average=avg, zero_division=0)
        averages[avg] = ClassMetrics(float(pa), float(ra), float(fa), int(len(y)))
    nan = float("nan")
    top_k = min(5, k_cls)
    # scikit-learn refuses k >= n_classes (and 2-column scores); every label is then in the top k anyway.
    top5 = float(top_k_accuracy_score(y, probs, k=top_k, labels=labels)) if top_k < k_cls else 1.0

    row_sums = probs.sum(axis=1)
    accuracy = float(accuracy_score(y, pred))
    return EvalResult(
        n=int(len(y)),
        classes=tuple(classes),
        loss=cross_entropy(y, z),
        accuracy=accuracy,
        error_rate=float(1.0 - accuracy),
        balanced_accuracy=_balanced_accuracy(balanced_accuracy_score, y, pred),
        top5=top5,
        top_k=top_k,
        confusion=cm.astype(np.int64),
        confusion_normalized=cm_norm.astype(np.float64),
        per_class={
            name: ClassMetrics(float(p[i]), float(r[i]), float(f[i]), int(s[i]))
            if s[i]
            else ClassMetrics(nan, nan, nan, 0)
            for i, name in enumerate(classes)
        },
        macro_avg=averages["macro"],
        weighted_avg=averages["weighted"],
        top_confusions={name: tuple(v) for name, v in top_confusions(cm, classes).items()},
        confused_pairs=tuple(confused_pairs(cm, classes)),
        calibration=calibration(conf, pred == y, n_bins),
        # The softmax output is read as a probability distribution: check that it is one.
        probability_check=ProbabilityCheck(
            min=float(probs.min()),
            max=float(probs.max()),
            max_abs_sum_error=float(np.abs(row_sums - 1.0).max()),
            is_distribution=bool(probs.min() >= 0 and probs.max() <= 1 and np.allclose(row_sums, 1.0)),
        ),
    )


# -- a saved run -----------------------------------------------------------------------------------------------


def split_images(run: Any, dataset: Any, split: str) -> tuple[Any, Any, Any]:
    """(images uint8, labels int64, dataset indices) of a run's test split or its reproduced validation split."""
    if split == "test":
        return dataset.x_test, dataset.y_test, torch.arange(len(dataset.y_test))
    if split != "val":
        raise UserError(f"unknown split {split!r}; use test or val")
    from cifarlab.data import recipe_split

    recipe = run.recipe
    if recipe.val_fraction <= 0:
        raise UserError(
            f"run {run.path} trained on all training images (val_fraction=0): it has no validation split; "
            "use --split test"
        )
    _, va_idx = recipe_split(recipe, dataset.y_train)
    return dataset.x_train[va_idx], dataset.y_train[va_idx], va_idx


def _fitted_on(run: Any) -> str | None:
    """What the run's temperature was fitted on, from metrics.json (None when it does not say, or is damaged)."""
    try:
        cal = run.metrics.get("calibration")
    except UserError:
        return None
    return str(cal["fitted_on"]) if isinstance(cal, dict) and cal.get("fitted_on") else None


def _image_folder_tree(path: Path) -> bool:
    """An ImageFolder tree: a folder with train/ and/or test/ inside."""
    return path.is_dir() and ((path / "train").is_dir() or (path / "test").is_dir())


def load_run_dataset(run: Any, data_dir: Path | None = None) -> Any:
    """The run's dataset, from `data_dir`, else $CIFARLAB_DATA, else the folder the run trained from (config.json's
    `data_dir`, where it still exists), else the default ~/.cache/cifarlab: on the machine it trained on, a run's
    data needs naming only once.

    A run trained on an image folder that has since moved: `data_dir` (or $CIFARLAB_DATA) may name the folder's
    new location, an ImageFolder tree itself; `check_dataset` then compares its checksum with the run's."""
    from cifarlab.data import load_dataset
    from cifarlab.data.dataset import NAMED_DATASETS

    name = run.recipe.dataset
    source = (run.config.get("dataset") or {}).get("source")
    is_path = "/" in name or os.sep in name
    in_memory = source == name and not is_path  # a folder's source is its path
    if name not in NAMED_DATASETS and in_memory and not Path(name).expanduser().exists():
        raise UserError(
            f"{run.path.name} was trained on data given in memory ({name!r}: arrays or a torch dataset), which no "
            "folder holds: pass the same data, e.g. cifarlab.load(run).evaluate(data=(x_train, y_train, x_test, "
            "y_test))"
        )
    if name not in NAMED_DATASETS and is_path and Path(name).is_absolute() and not Path(name).expanduser().exists():
        given = data_dir if data_dir is not None else os.environ.get("CIFARLAB_DATA") or None
        if given is not None and _image_folder_tree(Path(given).expanduser()):
            return load_dataset(Path(given).expanduser())
        where = f" ({given} is not one: it has no train/ or test/ folder)" if given is not None else ""
        raise UserError(
            f"{run.path.name} was trained on the image folder {name}, which is gone (moved or deleted): pass its "
            f"new location (the folder with train/ and test/ inside) with --data-dir{where}"
        )
    recorded = run.config.get("data_dir")
    recorded = recorded if isinstance(recorded, str) and recorded and Path(recorded).is_dir() else None
    if data_dir is None and not os.environ.get("CIFARLAB_DATA") and recorded is not None:
        data_dir = Path(recorded)
    try:
        return load_dataset(run.recipe.dataset, data_dir)
    except UserError as e:
        used = data_dir if data_dir is not None else os.environ.get("CIFARLAB_DATA")
        if recorded is None or used is None or Path(used).expanduser().resolve() == Path(recorded).resolve():
            raise
        env = os.environ.get("CIFARLAB_DATA")
        same = env and Path(env).expanduser().resolve() == Path(used).expanduser().resolve()
        how = "unset $CIFARLAB_DATA" if same else "leave out --data-dir"
        raise type(e)(f"{e} (the run trained from {recorded}: pass --data-dir {recorded}, or {how})") from None


TEST_DATA_KINDS = (
    "an image folder with test/<class>/ images (or its .tar.gz), the test folder itself, an official CIFAR "
    "archive or batches folder, or an IDX folder"
)


def resolve_test_data(path: Path | str, data_dir: Path | str | None = None) -> Path:
    """Where `evaluate --test-data PATH` reads from: PATH itself, else (a relative PATH) PATH inside `data_dir`
    (default $CIFARLAB_DATA or ~/.cache/cifarlab), with or without a tarball suffix. Not found: one line naming
    both places, and that --test-data takes a path (a dataset name such as cifar10 is not one)."""
    from cifarlab.data.dataset import canonical_dataset_name, data_dir_candidates, default_data_dir

    given = Path(path).expanduser()
    if given.exists() or given.is_symlink():
        return given
    where = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if not given.is_absolute():
        for candidate in data_dir_candidates(given, where):
            if candidate.exists() or candidate.is_symlink():
                return candidate
    looked = "" if given.is_absolute() else f" (looked in the current folder and in {where})"
    named = canonical_dataset_name(os.fspath(path))  # `--test-data cifar10`: a name, which is no path
    hint = (
        f" ({named} is a dataset name; for the run's own test set, leave --test-data out: --data-dir says where "
        "its data is)"
        if named is not None
        else ""
    )
    raise UserError(
        f"--test-data {path}: no such file or folder{looked}. --test-data takes a path: {TEST_DATA_KINDS}{hint}"
    )


def load_test_data(run: Any, path: Path | str, data_dir: Path | str | None = None) -> Any:
    """Another labelled test set for a run (`cifarlab evaluate --test-data`), as a `Dataset` in the run's terms.

    `path`: anything `load_dataset` reads (an ImageFolder tree or tarball, whose test/ split is used; an
    official CIFAR archive or batches folder), found as `resolve_test_data` says (a relative path also inside
    `data_dir`), decoded at the run's input size (one channel: the ITU-R 601
    luma). Its classes are matched to the run's by name: a subset is fine (labels are mapped to the run's
    indices), a class the run does not know is an error naming it. The result has the run's classes, an empty
    train split and no checksum (so it is never mistaken for the run's own data)."""
    from cifarlab.data import Dataset, load_dataset

    c, h, w = run.input_shape
    if h != w:
        raise UserError(f"the run takes {c}x{h}x{w} images; --test-data is decoded to square images only")
    ds = load_dataset(resolve_test_data(path, data_dir), image_size=h, test_only=True)
    classes = list(run.classes)
    # A class whose name holds "/" (Fashion-MNIST's "T-shirt/top") cannot name a folder: "_" stands in for it
    by_folder = {c.replace("/", "_"): c for c in classes if "/" in c}
    named = [name if name in classes else by_folder.get(name, name) for name in ds.classes]
    extra = [name for name, run_name in zip(ds.classes, named, strict=True) if run_name not in classes]
    slash = "".join(f"; a folder for {c!r} is named {f!r}" for f, c in list(by_folder.items())[:1])
    if extra and len(extra) == len(ds.classes):
        raise UserError(
            f"{path}: none of its classes {extra} is a class of the run ({classes}); a test set's class folders "
            f"must be named as the run's classes (a subset of them is fine){slash}"
        )
    if extra:
        missing = [name for name in classes if name not in named]
        raise UserError(
            f"{path}: classes {extra} are not classes of the run (its classes: {classes}); "
            f"a test set may hold a subset of the run's classes, named alike{slash}"
            + (f" (the data lacks {missing}, which is fine)" if missing else "")
        )
    x = ds.x_test
    if x.shape[1] != c:
        if c == 1 and x.shape[1] == 3:  # the luma, as predict and the ImageFolder loader make grey images
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * weights).sum(dim=1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise UserError(f"{path}: images have {x.shape[1]} channels; the run takes {c}")
    if tuple(x.shape[2:]) != (h, w):
        raise UserError(f"{path}: images are {x.shape[3]}x{x.shape[2]}; the run takes {w}x{h}")
    remap = torch.tensor([classes.index(name) for name in named], dtype=torch.int64)
    return Dataset(
        name=f"{ds.name} (test data)",
        classes=tuple(classes),
        x_train=x[:0].contiguous(),
        y_train=torch.zeros(0, dtype=torch.int64),
        x_test=x.contiguous(),
        y_test=remap[ds.y_test],
        source=ds.source,
        checksum="",
        cache_dir=ds.cache_dir,
    )


def check_dataset(run: Any, dataset: Any) -> DatasetCheck:
    """The dataset must have the run's classes in the run's order; a different checksum is only noted."""
    if list(dataset.classes) != run.classes:
        raise UserError(
            f"the dataset's classes {list(dataset.classes)} are not the run's {run.classes}; "
            "pass the data the run was trained on (--data-dir)"
        )
    shape = tuple(int(v) for v in dataset.x_test.shape[1:])
    if shape != tuple(run.input_shape):
        c, h, w = run.input_shape
        raise UserError(
            f"the dataset's images are {'x'.join(map(str, shape))} (channels x height x width); the run takes "
            f"{c}x{h}x{w}: pass the data the run was trained on (--data-dir)"
        )
    saved = (run.config.get("dataset") or {}).get("checksum") or ""
    return DatasetCheck(
        name=dataset.name,
        source=str(dataset.source),
        checksum=dataset.checksum,
        checksum_matches_run=(dataset.checksum == saved) if saved and dataset.checksum else None,
    )


def dataset_warning(ev: EvalResult) -> str | None:
    """The one-line warning to show first when the data evaluated is not the run's; None when it is (or
    when that cannot be known)."""
    if not ev.dataset_mismatch:
        return None
    assert ev.dataset is not None
    return (
        f"the data evaluated ({ev.dataset.source}, checksum {ev.dataset.checksum or 'unknown'}) is not the data "
        f"this run was trained on (its checksum differs): the {ev.split_name} numbers are not the run's "
        "and cannot be compared with its training numbers; pass the run's data with --data-dir"
    )


def evaluate_run(
    run_dir: Path,
    split: str = "test",
    data_dir: Path | None = None,
    dataset: Any = None,
    logits: torch.Tensor | None = None,
) -> tuple[EvalResult, Predictions]:
    """Evaluate a saved run on its test split (or its reproduced validation split).

    Returns (evaluation, predictions): the `EvalResult` of `evaluate_predictions` with split, dataset check
    and inference settings and timing filled in; and the arrays behind it for the report.
    `logits`: the split's logits when the caller already has them (training just computed the test
    logits with the same settings), so inference is not run twice.
    """
    from cifarlab.inference import autocast_dtype, predict_logits, recipe_options, resolve_device
    from cifarlab.runs import load_run

    run = load_run(run_dir)
    if dataset is None:
        dataset = load_run_dataset(run, data_dir)
    data_info = check_dataset(run, dataset)
    x, y, idx = split_images(run, dataset, split)
    recipe = run.recipe
    mean, std = run.normalization
    device = resolve_device("auto")
    t0 = time.perf_counter()
    reused = logits is not None and len(logits) == len(y)
    if logits is None or not reused:
        logits = predict_logits(
            run.inference_model(device), x, mean=mean, std=std, device=device, **recipe_options(recipe)
        )
    predict_seconds = None if reused else time.perf_counter() - t0
    y_np = y.numpy() if hasattr(y, "numpy") else np.asarray(y)
    temperature = run.temperature
    # Every probability is the one predict and serve give: the logits divided by the fitted temperature.
    z = logits.numpy().astype(np.float64) / temperature
    t0 = time.perf_counter()
    ev = evaluate_predictions(y_np, z, run.classes)
    uncalibrated_ece = uncalibrated_loss = fitted_on = None
    if temperature != 1.0:
        raw = softmax(logits.numpy())
        uncalibrated_ece = calibration(raw.max(axis=1), raw.argmax(axis=1) == y_np).ece
        uncalibrated_loss = cross_entropy(y_np, logits.numpy())
        fitted_on = _fitted_on(run)
    inference = InferenceInfo(
        device=str(device),
        tta=recipe.tta,
        precision=recipe.precision,
        # what "auto" resolved to on this machine: bf16 only where the CPU/GPU has it natively
        dtype=str(autocast_dtype(recipe.precision, device) or torch.float32).replace("torch.", ""),
        channels_last=recipe.channels_last,
        batch_size=recipe.eval_batch_size,
        predict_seconds=predict_seconds,
        images_per_second=len(y_np) / predict_seconds if predict_seconds else None,
        logits_from="training" if reused else "this evaluation",
        metrics_seconds=time.perf_counter() - t0,
        temperature=temperature,
        uncalibrated_ece=uncalibrated_ece,
        temperature_fitted_on=fitted_on,
        uncalibrated_loss=uncalibrated_loss,
    )
    ev = ev.with_run_info(split, data_info, inference)
    probs = softmax(z)
    preds = Predictions(
        logits=z,
        probs=probs,
        y_true=y_np,
        y_pred=probs.argmax(axis=1),
        images=x,
        indices=np.asarray(idx),
        dataset=dataset,
        run=run,
    )
    return ev, preds


# -- terminal summary ------------------------------------------------------------------------------------------


def format_summary(ev: EvalResult) -> str:
    """The terminal summary of `cifarlab evaluate`: headline numbers, per-class table, top confusions.

    Class names come from the data (an image folder's names): control characters and escape sequences in
    them are shown escaped, never sent to the terminal."""

    cal = ev.calibration
    inf = ev.inference
    lines = [
        f"{ev.split_name} split: {ev.n:,} images"
        + (f" (TTA {terminal_safe(inf.tta)}, {inf.predict_seconds or 0:.1f} s)" if inf is not None else ""),
        f"accuracy {ev.accuracy:.2%}   "
        # top-k with k >= the number of classes is 100% by construction: not shown
        + (f"top-{ev.top_k} {ev.top5:.2%}   " if ev.top_k_informative else "")
        + f"loss {ev.loss:.4f}   "
        f"ECE {cal.ece:.2%} (mean confidence {cal.mean_confidence:.2%})",
        "",
    ]
    names = {c: terminal_safe(c) for c in ev.classes}
    labels = ("macro avg", "weighted avg")
    width = max(8, *(len(s) for s in names.values()), *(len(s) for s in labels))
    lines.append(f"{'class':<{width}}  precision  recall     f1  support  most confused with")

    def row(label: str, m: ClassMetrics) -> str:
        if not m.applicable:  # a class with no image here: its scores do not exist (NaN)
            return f"{label:<{width}}  {'n/a':>9}  {'n/a':>6}  {'n/a':>5}  {m.support:>7}"
        return f"{label:<{width}}  {m.precision:>9.3f}  {m.recall:>6.3f}  {m.f1:>5.3f}  {m.support:>7}"

    for name, m in ev.per_class.items():
        conf = ", ".join(f"{terminal_safe(o)} {s:.0%}" for o, s in ev.top_confusions[name])
        lines.append(f"{row(names[name], m)}  {conf}".rstrip())
    lines.append(row("macro avg", ev.macro_avg))
    lines.append(row("weighted avg", ev.weighted_avg))
    absent = [names[c] for c in ev.classes if not ev.per_class[c].applicable]
    if absent:
        lines.append(
            f"(no {ev.split_name} image of {', '.join(absent)}: n/a, left out of the macro and weighted averages)"
        )
    if ev.confused_pairs:
        lines.append("")
        lines.append(
            "most confused pairs: "
            + "; ".join(f"{terminal_safe(p.a)} <-> {terminal_safe(p.b)} {p.count}" for p in ev.confused_pairs[:5])
        )
    return "\n".join(lines)
