"""From uint8 images to float batches: train/validation splits, pixel statistics, scaling, `BatchLoader`.

Everything here works for any channel count and image size: images are uint8 ``(N, C, H, W)``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cifarlab.device import to_device_async
from cifarlab.errors import ConfigError, DataError

__all__ = ["BatchLoader", "channel_stats", "recipe_split", "scale_images", "scaling_constants", "split_indices"]

log = logging.getLogger(__name__)

# A channel whose std (in [0, 1] units) is below this is constant: standardizing divides by 1.0 instead, so it
# becomes 0 rather than inf/NaN (one pixel level is 1/255 ~ 0.004, so a real channel is far above it).
CONSTANT_STD = 1e-6


def recipe_split(
    recipe: Any, y_train: torch.Tensor, classes: Sequence[str] | None = None, *, needs_validation: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A recipe's (train_idx, val_idx) of `y_train`: its val_fraction, seed and stratification. Training,
    `evaluate --split val` and `cifarlab calibrate` all reproduce a run's split through this one call.

    `classes` (training passes them): a class with training images that the split moves wholly into the
    validation set is a `DataError` naming it, as a class without training images is before the split (it
    would never be learned). `needs_validation` (tune's trials): the advice leaves out val_fraction=0."""
    labels = y_train if recipe.stratified_split else None
    tr_idx, va_idx = split_indices(len(y_train), recipe.val_fraction, recipe.seed, labels=labels)
    if classes is not None and len(va_idx):
        _check_split_keeps_classes(recipe, y_train, tr_idx, classes, needs_validation)
    return tr_idx, va_idx


def _check_split_keeps_classes(
    recipe: Any, y_train: torch.Tensor, tr_idx: torch.Tensor, classes: Sequence[str], needs_validation: bool
) -> None:
    y = torch.as_tensor(y_train).long()
    before = torch.bincount(y, minlength=len(classes))
    after = torch.bincount(y[tr_idx], minlength=len(classes))
    lost = [i for i in range(len(classes)) if before[i] > 0 and after[i] == 0]
    if not lost:
        return
    held = ", ".join(f"{classes[i]} ({int(before[i])} image{'s' * (int(before[i]) != 1)})" for i in lost)
    fixes = []
    if not recipe.stratified_split:  # suggested only where it does keep every class in training
        strat, _ = split_indices(len(y), recipe.val_fraction, recipe.seed, labels=y)
        if bool((torch.bincount(y[strat], minlength=len(classes))[before > 0] > 0).all()):
            fixes.append("use --set stratified_split=true (each class keeps its share in training)")
    fixes.append("add training images")
    if not needs_validation:
        no_val = "use --set val_fraction=0 (no validation split"
        if getattr(recipe, "schedule", "") == "plateau":  # it monitors a validation metric: refused without one
            no_val += ", and schedule=onecycle"
        fixes.append(no_val + ")")
    many = len(lost) > 1
    how = ", ".join(fixes[:-1]) + (", or " if len(fixes) > 2 else " or ") + fixes[-1] if len(fixes) > 1 else fixes[0]
    raise DataError(
        f"the {recipe.val_fraction:g} validation split (seed {recipe.seed}) holds out every training image of "
        f"{'classes' if many else 'class'} {held}: {'they' if many else 'it'} would never be learned. "
        f"{how[0].upper()}{how[1:]}."
    )


def split_indices(
    n: int, val_fraction: float, seed: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(n)`` into (train_idx, val_idx), each sorted ascending (int64).

    ``len(val_idx) == round(n * val_fraction)``. With `labels` the split is stratified: every class gives the
    same fraction (largest-remainder rounding so the total is still exact). Same arguments, same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    n_val = round(n * val_fraction)
    if labels is None:
        perm = torch.randperm(n, generator=g)
        val = perm[:n_val]
    else:
        labels = torch.as_tensor(labels).long()
        if labels.shape != (n,):
            raise ConfigError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        classes, counts = torch.unique(labels, return_counts=True)
        exact = counts.double() * n_val / max(n, 1)
        quota = exact.floor().long()
        # Hand the leftover val slots to the classes with the largest fractional parts (ties: lower class).
        order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - quota[i]).item(), i))
        for i in order[: n_val - int(quota.sum())]:
            quota[i] += 1
        parts = []
        for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
            members = (labels == c).nonzero().flatten()
            parts.append(members[torch.randperm(len(members), generator=g)[:q]])
        val = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    return mask.nonzero().flatten(), val.sort().values


def channel_stats(x: torch.Tensor, *, for_scaling: bool = True) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images ``(N, C, H, W)``, in [0, 1] units: two tuples of
    length C.

    Exact, from a 256-bin histogram per channel (no float copy of the whole set). `for_scaling` (the
    standardize constants training uses): a constant channel (std below `CONSTANT_STD`: a blank alpha, an
    unused colour) gets std 1.0, so it standardizes to 0 instead of dividing by zero, with a warning naming
    it; `for_scaling=False` gives the plain statistics.
    """
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"channel_stats needs uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1).cpu(), minlength=256).double()
        total = hist.sum().clamp_min(1)
        mean = (hist * values).sum() / total
        var = (hist * values.square()).sum() / total - mean.square()
        means.append(float(mean))
        stds.append(float(var.clamp_min(0).sqrt()))
    constant = [c for c, s in enumerate(stds) if s < CONSTANT_STD] if for_scaling else []
    if constant:
        names = _channel_names(len(stds))
        for c in constant:
            stds[c] = 1.0
        log.warning(
            "channel%s %s of the training images %s constant (value %s): standardized with std 1.0, so it is 0 "
            "for the model",
            "s" * (len(constant) > 1),
            ", ".join(names[c] for c in constant),
            "are" if len(constant) > 1 else "is",
            ", ".join(f"{means[c]:.4f}" for c in constant),
        )
    return tuple(means), tuple(stds)


def _channel_names(n: int) -> list[str]:
    return {1: ["grey"], 2: ["grey", "alpha"], 3: ["R", "G", "B"], 4: ["R", "G", "B", "A"]}.get(
        n, [str(i) for i in range(n)]
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    # Stable across processes and platforms (unlike hash()): a resumed run at epoch e draws what an
    # uninterrupted one would.
    digest = hashlib.blake2b(f"cifarlab:{int(seed)}:{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def scaling_constants(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(scale, shift) with x_uint8 * scale + shift == (x/255 - mean) / std; (None, None) without mean/std.

    Training (`BatchLoader`) and inference (`inference.to_float`) both scale through this and
    `scale_images`, so the two see bit-identical inputs.
    """
    if mean is None or std is None:
        return None, None
    m = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
    if m.numel() != channels or s.numel() != channels or bool((s <= 0).any()):
        raise ConfigError(f"mean and std need {channels} values each (std > 0), got {mean} and {std}")
    # (x/255 - m)/s == x * (1/(255 s)) + (-m/s): one multiply and one add per element.
    scale = (1.0 / (255.0 * s)).to(device, dtype).reshape(1, -1, 1, 1)
    shift = (-m / s).to(device, dtype).reshape(1, -1, 1, 1)
    return scale, shift


def scale_images(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """In place on a float copy of uint8 pixels: /255, then the per-channel normalization if given."""
    if scale is None or shift is None:
        return x.div_(255.0)
    return x.mul_(scale).add_(shift)


class BatchLoader:
    """Batches from uint8 images held in memory (on `device`), converted to float one batch at a time.

    Per epoch: one ``torch.randperm`` from a CPU ``torch.Generator`` seeded from (seed, epoch). Per batch:
    gather, move to `device`, to `dtype`, ``/255``, ``(x - mean) / std`` when given (one fused multiply-add),
    then ``transform(xb, generator=g, indices=idx, epoch=epoch)`` with that same CPU generator (draw random
    numbers on the CPU, then move them), then, where `scales` gives epoch e a scale below 1, an area-average
    resize of the batch to that fraction of its height and width (progressive resizing: early epochs on smaller
    images cost a fraction of a full-size step; the last scale holds for later epochs), then channels_last when
    asked.

    Sharded (`world` > 1, one loader per process under torchrun): every rank builds each global batch of
    `batch_size` exactly as one process would (same order, same scaling, the transform on the whole global batch
    with the same generator, so the same augmentation draws) and yields its contiguous slice: rank r of W gets
    rows ``[r*B/W, (r+1)*B/W)``. `batch_size` must be a multiple of `world`. A last partial global batch of b
    images is split as evenly as `torch.tensor_split` does (sizes differ by at most one) and `shard_weight`
    gives each rank the factor that makes the average of the ranks' mean losses the global batch's mean loss;
    when b < `world` (some rank would get no image) that batch is dropped on every rank. `len()` counts
    global batches, the same on every rank.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        transform: Callable[..., torch.Tensor] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world: int = 1,
        scales: Sequence[float] = (),
    ) -> None:
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"y must be ({len(x)},), got {tuple(y.shape)}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std, or neither")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of world {world} is not a place in the group")
        if batch_size % world:
            raise ConfigError(
                f"batch_size={batch_size} is not a multiple of the {world} processes: each process takes an equal "
                f"slice of every global batch; use a batch_size divisible by {world}"
            )
        if any(not 0 < s <= 1 for s in scales):
            raise ConfigError(f"train_scales={tuple(scales)!r}: each scale must be in (0, 1]")
        self.scales = tuple(float(s) for s in scales)
        self.rank, self.world = int(rank), int(world)
        self.device = torch.device(device)
        # uint8 is 4x smaller than float: keep the whole set on the device once, not a copy per batch.
        self.x = x.to(self.device).contiguous()
        self.y = y.to(self.device, torch.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.transform = transform
        self.channels_last = channels_last
        self.dtype = dtype
        self._scale, self._shift = scaling_constants(mean, std, x.shape[1], self.device, dtype)
        self.mean = tuple(float(v) for v in mean) if mean is not None else None
        self.std = tuple(float(v) for v in std) if std is not None else None

    def __len__(self) -> int:
        n, b = len(self.x), self.batch_size
        if self.world > 1 and not self.drop_last and 0 < n % b < self.world:
            return n // b  # the last global batch has fewer images than processes: dropped (see the docstring)
        return n // b if self.drop_last else math.ceil(n / b)

    def _shard(self, size: int) -> tuple[int, int]:
        """This rank's [start, stop) within a global batch of `size` images (torch.tensor_split's sizes)."""
        q, extra = divmod(size, self.world)
        start = self.rank * q + min(self.rank, extra)
        return start, start + q + (1 if self.rank < extra else 0)

    def global_batch_size(self, batch: int) -> int:
        """The number of images in global batch `batch` (all ranks' slices together)."""
        return min(self.batch_size, len(self.x) - batch * self.batch_size)

    def shard_weight(self, batch: int) -> float:
        """The factor on this rank's mean loss at global batch `batch` so that averaging the ranks' gradients
        (what DistributedDataParallel does) gives the gradient of the global batch's mean loss: n_rank * W / b.
        Exactly 1.0 for every full batch."""
        size = self.global_batch_size(batch)
        start, stop = self._shard(size)
        return (stop - start) * self.world / size

    def generator(self, epoch: int) -> torch.Generator:
        """The CPU generator an epoch uses (fresh, seeded from (seed, epoch))."""
        return torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of an epoch (int64, CPU)."""
        return self._order(self.generator(epoch))

    def _order(self, g: torch.Generator) -> torch.Tensor:
        n = len(self.x)
        return torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)

    def image_size(self, epoch: int) -> tuple[int, int]:
        """(height, width) of the images an epoch yields: the data's, times that epoch's scale."""
        h, w = self.x.shape[-2:]
        s = self.scales[min(epoch, len(self.scales) - 1)] if self.scales else 1.0
        return (max(1, round(h * s)), max(1, round(w * s))) if s != 1 else (int(h), int(w))

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (xb float (B, C, H, W) on `device`, yb int64) for one epoch."""
        g = self.generator(epoch)
        size = self.image_size(epoch)
        resize = size != tuple(self.x.shape[-2:])
        order = self._order(g)
        # On a GPU, the epoch's order is copied once and sliced there: no copy (and no wait) per batch.
        dev_order = to_device_async(order, self.device)
        for b in range(len(self)):
            idx = dev_order[b * self.batch_size : (b + 1) * self.batch_size]
            xb = scale_images(self.x.index_select(0, idx).to(self.dtype), self._scale, self._shift)
            if self.transform is not None:
                xb = self.transform(xb, generator=g, indices=idx, epoch=epoch)
            if resize:  # after augmenting, so crops and flips keep their meaning in full-size pixels
                xb = F.interpolate(xb, size=size, mode="area")
            yb = self.y.index_select(0, idx)
            if self.world > 1:
                start, stop = self._shard(len(idx))
                xb, yb = xb[start:stop], yb[start:stop]
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb

    def __repr__(self) -> str:
        return (
            f"BatchLoader(n={len(self.x)}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, seed={self.seed}, device={self.device}"
            + (f", rank={self.rank}, world={self.world})" if self.world > 1 else ")")
        )
