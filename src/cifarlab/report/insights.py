"""The report's "why" material, computed before anything is drawn: which test images to show (the top confused
pairs in both directions, the top losses, the least certain right and wrong predictions), their Grad-CAM
overlays (`cifarlab.explain`, imported lazily: without Captum the report says so and still builds), and the
model's size, FLOPs per image and measured CPU latency.

Everything is bounded so a report stays fast on a CPU: at most `PER_DIRECTION` images per direction of each of
the `N_PAIRS` pairs, `N_TOP_LOSSES` top losses, `N_UNCERTAIN` images per least-certain grid, and about
`LATENCY_BUDGET` seconds of latency measurement.
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cifarlab.evaluate import EvalResult, Predictions

N_PAIRS = 3
PER_DIRECTION = 6
N_TOP_LOSSES = 16
N_UNCERTAIN = 8
LATENCY_BATCH = 256
LATENCY_BUDGET = 0.8  # seconds for the repeats of both batch sizes together (after one warm-up each)
SALIENCY_INSTALL = "saliency unavailable: pip install 'cifarlab[explain]'"


@dataclass(frozen=True)
class Item:
    """One test image as the report shows it: `pos` indexes the split's arrays, `index` the dataset's."""

    pos: int
    index: int
    true: str
    predicted: str
    p_true: float
    p_pred: float
    loss: float  # cross-entropy of this image
    margin: float  # top-1 minus top-2 probability

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "true": self.true,
            "predicted": self.predicted,
            "p_true": self.p_true,
            "p_predicted": self.p_pred,
            "loss": self.loss,
            "margin": self.margin,
        }


@dataclass(frozen=True)
class PairGallery:
    """A confused pair: images of `a` predicted as `b` (most confident first) and the other way round;
    `n_a_as_b` / `n_b_as_a` count all of them, the lists hold at most `PER_DIRECTION`."""

    a: str
    b: str
    a_as_b: tuple[Item, ...]
    b_as_a: tuple[Item, ...]
    n_a_as_b: int
    n_b_as_a: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "a_as_b": {"count": self.n_a_as_b, "shown": [i.to_dict() for i in self.a_as_b]},
            "b_as_a": {"count": self.n_b_as_a, "shown": [i.to_dict() for i in self.b_as_a]},
        }


@dataclass
class Insights:
    pairs: list[PairGallery] = field(default_factory=list)
    top_losses: list[Item] = field(default_factory=list)
    uncertain_correct: list[Item] = field(default_factory=list)
    uncertain_wrong: list[Item] = field(default_factory=list)
    overlays: dict[int, np.ndarray] = field(default_factory=dict)  # pos -> (H, W, 3) uint8 Grad-CAM overlay
    saliency_note: str | None = None  # why there are no overlays
    model: dict[str, Any] | None = None
    model_note: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "confused_pairs": [p.to_dict() for p in self.pairs],
            "saliency": {"method": "gradcam", "available": not self.saliency_note, "note": self.saliency_note},
            "top_losses": [i.to_dict() for i in self.top_losses],
            "least_certain_correct": [i.to_dict() for i in self.uncertain_correct],
            "least_certain_wrong": [i.to_dict() for i in self.uncertain_wrong],
        }


# -- choosing the images ---------------------------------------------------------------------------------------


def per_image_loss(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross-entropy of each image, from the logits (log-sum-exp, float64)."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    log_norm = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return log_norm - z[np.arange(len(z)), y]


def _items(preds: Predictions, classes: list[str], positions: np.ndarray, loss: np.ndarray) -> list[Item]:
    probs, y, pred = preds.probs, preds.y_true, preds.y_pred
    out = []
    for i in positions.tolist():
        top2 = np.sort(probs[i])[-2:] if probs.shape[1] > 1 else np.array([0.0, probs[i, 0]])
        out.append(
            Item(
                pos=int(i),
                index=int(preds.indices[i]),
                true=classes[int(y[i])],
                predicted=classes[int(pred[i])],
                p_true=float(probs[i, y[i]]),
                p_pred=float(probs[i, pred[i]]),
                loss=float(loss[i]),
                margin=float(top2[-1] - top2[-2]),
            )
        )
    return out


def select(ev: EvalResult, preds: Predictions) -> Insights:
    """The images the report shows; no drawing, no model."""
    classes = list(ev.classes)
    y, pred, probs = preds.y_true, preds.y_pred, preds.probs
    loss = per_image_loss(preds.logits, y)
    top1 = probs.max(axis=1)
    ins = Insights()
    for p in ev.confused_pairs[:N_PAIRS]:
        ia, ib = classes.index(p.a), classes.index(p.b)
        dirs = []
        for src, dst in ((ia, ib), (ib, ia)):
            pos = np.flatnonzero((y == src) & (pred == dst))
            order = pos[np.argsort(-probs[pos, dst], kind="stable")]  # the most confident confusions first
            dirs.append((_items(preds, classes, order[:PER_DIRECTION], loss), len(pos)))
        ins.pairs.append(PairGallery(p.a, p.b, tuple(dirs[0][0]), tuple(dirs[1][0]), dirs[0][1], dirs[1][1]))
    ins.top_losses = _items(preds, classes, np.argsort(-loss, kind="stable")[:N_TOP_LOSSES], loss)
    right = np.flatnonzero(pred == y)
    wrong = np.flatnonzero(pred != y)
    ins.uncertain_correct = _items(preds, classes, right[np.argsort(top1[right], kind="stable")][:N_UNCERTAIN], loss)
    ins.uncertain_wrong = _items(preds, classes, wrong[np.argsort(top1[wrong], kind="stable")][:N_UNCERTAIN], loss)
    return ins


# -- saliency ------------------------------------------------------------------------------------------------


def saliency_overlays(
    model: torch.nn.Module, images: Any, items: list[Item], targets: list[int], run: Any
) -> tuple[dict[int, np.ndarray], str | None]:
    """Grad-CAM overlays ({pos: (H, W, 3) uint8}) of `items` for the class in `targets` (the predicted one),
    on the CPU, in one batch; ({}, why) when `cifarlab.explain` or Captum is missing or the model cannot be
    explained: the report then says so and still builds."""
    if not items:
        return {}, None
    try:
        from cifarlab.explain import overlay, saliency
    except ImportError:
        return {}, SALIENCY_INSTALL
    from cifarlab.errors import UserError

    mean, std = run.normalization
    x = images[torch.as_tensor([i.pos for i in items])]
    try:
        heat = saliency(model, x, method="gradcam", target=torch.as_tensor(targets), mean=mean, std=std, device="cpu")
        return {it.pos: overlay(x[k], heat[k]) for k, it in enumerate(items)}, None
    except ImportError:
        return {}, SALIENCY_INSTALL
    except UserError as e:
        return {}, SALIENCY_INSTALL if "captum" in str(e).lower() else f"saliency unavailable: {e}"
    except (RuntimeError, ValueError) as e:  # a model Grad-CAM cannot take: the report still builds
        return {}, f"saliency unavailable: {type(e).__name__}: {e}"


# -- the model: size, FLOPs, latency -------------------------------------------------------------------------


@contextlib.contextmanager
def _without_compiler_guard(mode_cls: type | None) -> Iterator[None]:
    """Run `mode_cls.__torch_dispatch__` as it is, beneath torch's compiler-disable guard.

    torch wraps every dispatch mode's `__torch_dispatch__` in a guard whose first call imports torch._dynamo
    (~1 s on a 2-core Zen 4, ~3 s on a Zen 3) only to keep the compiler out of it; nothing is compiled here.
    The guard calls the callable it caches on the raw function, so for the count that cache is the function
    itself; it is removed afterwards. Where torch wraps differently (another version), nothing changes but the
    import."""
    guarded = vars(mode_cls).get("__torch_dispatch__") if mode_cls is not None else None
    raw = inspect.unwrap(guarded) if callable(guarded) else None
    key = "__dynamo_disable"  # the cache attribute of torch._compile._disable_dynamo
    own = raw is not None and raw is not guarded and not hasattr(raw, key)
    if own:
        setattr(raw, key, raw)
    try:
        yield
    finally:
        if own and getattr(raw, key, None) is raw:
            delattr(raw, key)


def count_flops(model: torch.nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass on one image (torch's FlopCounterMode: a multiply-add counts 2)."""
    from torch.utils import flop_counter

    was_training = model.training
    model.eval()
    try:
        with _without_compiler_guard(getattr(flop_counter, "_FlopCounterMode", None)), torch.no_grad():
            with flop_counter.FlopCounterMode(display=False) as counter:
                model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def measure_latency(model: torch.nn.Module, images: torch.Tensor, run: Any, budget: float = LATENCY_BUDGET) -> dict:
    """Median seconds of `predict_logits` on the CPU, in the run's precision and memory format, without
    test-time augmentation, for batch 1 and a batch of `LATENCY_BATCH`; one warm-up each, then repeats until
    the budget (split between the two) is spent (at least one)."""
    from cifarlab.inference import autocast_dtype, predict_logits

    recipe = run.recipe
    mean, std = run.normalization
    device = torch.device("cpu")
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    reps = max(1, -(-LATENCY_BATCH // max(1, len(images))))
    big = images.repeat(reps, 1, 1, 1)[:LATENCY_BATCH] if len(images) else torch.zeros(0)
    out: dict[str, Any] = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "precision": recipe.precision,
        "dtype": str(autocast_dtype(recipe.precision, device) or torch.float32).replace("torch.", ""),
        "channels_last": recipe.channels_last,
    }
    for name, x, share in (("batch_1", images[:1], 0.35), (f"batch_{LATENCY_BATCH}", big, 0.65)):
        if not len(x):
            continue

        def once(x: torch.Tensor = x) -> float:
            t = time.perf_counter()
            predict_logits(
                model, x, mean=mean, std=std, batch_size=len(x), device=device, precision=recipe.precision,
                channels_last=recipe.channels_last, tta="none",
            )  # fmt: skip
            return time.perf_counter() - t

        once()  # warm-up: allocator, autocast caches
        times: list[float] = []
        deadline = time.perf_counter() + budget * share
        while not times or (time.perf_counter() < deadline and len(times) < 15):
            times.append(once())
        med = statistics.median(times)
        out[name] = {"batch": len(x), "seconds": med, "ms_per_image": 1000 * med / len(x), "repeats": len(times)}
    return out


def trained_counts(model: torch.nn.Module, recipe: Any) -> dict[str, int]:
    """`count_parameters` of `model` with the parameters its run froze taken out of training, as training did
    (`apply_freeze`: the recipe's `freeze_stages`), so trainable/non-trainable counts are the run's. The
    model's own flags are put back: the report's saliency maps still need gradients through it."""
    from cifarlab.errors import ConfigError
    from cifarlab.finetune import apply_freeze
    from cifarlab.models import count_parameters

    flags = [p.requires_grad for p in model.parameters()]
    try:
        apply_freeze(model, getattr(recipe, "freeze_stages", 0), getattr(recipe, "model", ""))
    except ConfigError:  # the run could not have trained so: count the model as it is
        pass
    try:
        return count_parameters(model)
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def model_info(model: torch.nn.Module, run: Any, images: torch.Tensor) -> dict[str, Any]:
    counts = trained_counts(model, run.recipe)
    return {
        "name": run.recipe.model,
        "parameters": counts,
        "input_shape": list(run.input_shape),
        "flops_per_image": count_flops(model, run.input_shape),
        "latency": measure_latency(model, images, run),
    }


def collect(run: Any, ev: EvalResult, preds: Predictions) -> Insights:
    """Pick the images, explain the confused pairs' ones, and measure the model (one model load, CPU)."""
    t0 = time.perf_counter()
    ins = select(ev, preds)
    t1 = time.perf_counter()
    ins.seconds["select_seconds"] = t1 - t0
    try:
        model = run.build_model().to("cpu").eval()
    except Exception as e:  # noqa: BLE001 - weights missing or damaged: everything but these parts still builds
        ins.saliency_note = ins.model_note = f"the model could not be loaded ({type(e).__name__}: {e})"
        return ins
    classes = list(ev.classes)
    gallery = [it for p in ins.pairs for it in (*p.a_as_b, *p.b_as_a)]
    ins.overlays, ins.saliency_note = saliency_overlays(
        model, preds.images, gallery, [classes.index(it.predicted) for it in gallery], run
    )
    t2 = time.perf_counter()
    ins.seconds["saliency_seconds"] = t2 - t1
    images = preds.images if isinstance(preds.images, torch.Tensor) else torch.as_tensor(preds.images)
    ins.model = model_info(model, run, images[:LATENCY_BATCH])
    ins.seconds["model_seconds"] = time.perf_counter() - t2
    return ins
