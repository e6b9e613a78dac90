"""Batched data augmentation as tensor ops (no per-image Python).

Two augmenters share one call signature, `aug(x, *, generator, indices=None, epoch=0)`, on a float
batch `(B, C, H, W)` (the loader scales before augmenting); `generator` is a CPU generator and `indices` (the
batch's dataset indices) are on the batch's device:

- `KerasAugment`: Keras 3 `ImageDataGenerator(rotation_range, width_shift_range,
  height_shift_range, horizontal_flip)` with fill_mode="nearest" and order-1 interpolation. Every
  image gets a fresh transform per call; the whole batch is one `affine_grid` + one `grid_sample`.
- `FlipTranslate`: airbench-style random crop from a reflect-padded image plus horizontal flip,
  optionally airbench's alternating flip. One pair of gathers per batch.

Keras geometry (keras/src/legacy/preprocessing/image.py, `apply_affine_transform`): the 3x3 matrix
M = R(theta) @ Shift(tx, ty) is centred with `transform_matrix_offset_center(M, h, w)`
(o = h/2 - 0.5, w/2 - 0.5) and, in Keras 3, conjugated by the x/y swap P (M' = P M P) before
`scipy.ndimage.affine_transform`, which pulls: out[p] = in[M' p]. So M acts on (x=column, y=row):
    in_xy = o + R(theta) @ (out_xy - o + (tx, ty))
i.e. for theta=0 the content moves left by tx and up by ty pixels, and positive theta rotates the
content counter-clockwise as displayed (row 0 at the top): theta=90 equals torch.rot90(k=1,
dims=(-2, -1)). Keras draws tx from height_shift_range * H and ty from width_shift_range * W
(names from before the swap); we draw the same way, which only matters for non-square images or
unequal ranges. The horizontal flip is applied after the affine warp (Keras' order); here it is
folded into the matrix as a mirror of the output x axis, so it costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cifarlab.device import to_device_async
from cifarlab.registry import AUGMENTS

__all__ = ["FlipTranslate", "KerasAugment", "describe_augment", "flip_bits", "make_augment"]

_FLOAT_NATIVE = (torch.float32, torch.float64)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _check_batch(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")


@dataclass(frozen=True)
class KerasAugment:
    """Keras `ImageDataGenerator` rotation / shift / horizontal-flip augmentation, batched.

    Ranges follow Keras: `rotation_range` in degrees (uniform in +-range); a shift range below 1 is
    a fraction of the image size, 1 or more is pixels (uniform, real-valued, as Keras draws floats).
    """

    rotation_range: float = 5.0
    width_shift_range: float = 0.05
    height_shift_range: float = 0.05
    horizontal_flip: bool = True

    def __post_init__(self) -> None:
        for name in ("rotation_range", "width_shift_range", "height_shift_range"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def describe(self) -> str:
        return (
            f"Keras ImageDataGenerator: rotation ±{self.rotation_range:g}°, shift ±{self.width_shift_range:g} "
            f"(width) / ±{self.height_shift_range:g} (height), horizontal flip "
            f"{'on' if self.horizontal_flip else 'off'}, fill nearest"
        )

    def __call__(
        self, x: Tensor, *, generator: torch.Generator, indices: Tensor | None = None, epoch: int = 0
    ) -> Tensor:
        """Augment a batch with a fresh random transform per image (indices/epoch are unused)."""
        _check_batch(x)
        params = self.sample_params(x.shape[0], generator, size=(x.shape[-2], x.shape[-1]))
        return self.apply(x, params)

    def sample_params(
        self, n: int, generator: torch.Generator, *, size: tuple[int, int] = (32, 32)
    ) -> dict[str, Tensor]:
        """Draw `n` transforms: theta_deg, tx_px, ty_px (float64) and flip (bool), on the generator's device.

        `tx_px`/`ty_px` are Keras' `tx`/`ty`: tx moves along the width (x) axis but is drawn from
        height_shift_range * H, ty along the height axis from width_shift_range * W (Keras 3).
        """
        h, w = size
        u = torch.rand(n, 4, generator=generator, dtype=torch.float64, device=generator.device)
        sym = 2.0 * u[:, :3] - 1.0  # uniform in [-1, 1)
        hs = self.height_shift_range * (h if self.height_shift_range < 1 else 1)
        ws = self.width_shift_range * (w if self.width_shift_range < 1 else 1)
        return {
            "theta_deg": sym[:, 0] * self.rotation_range,
            "tx_px": sym[:, 1] * hs,
            "ty_px": sym[:, 2] * ws,
            "flip": (u[:, 3] < 0.5) & self.horizontal_flip,
        }

    def theta(self, params: dict[str, Tensor], size: tuple[int, int]) -> Tensor:
        """The (B, 2, 3) float64 `affine_grid` matrices (normalized coordinates, align_corners=False)."""
        h, w = size
        rad = torch.deg2rad(params["theta_deg"].double())
        c, s = torch.cos(rad), torch.sin(rad)
        tx, ty = params["tx_px"].double(), params["ty_px"].double()
        # Pixel centres p = a * n + (size - 1) / 2 for align_corners=False: the same centre Keras
        # uses, and the normalize/unnormalize round trip is exact for power-of-two sizes (so an
        # identity or integer transform of a 32x32 image returns exact pixels); align_corners=True
        # was measured 3e-6 off at 32 px.
        ax, ay = w / 2.0, h / 2.0
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        ox, oy = h / 2.0 - 0.5, w / 2.0 - 0.5  # Keras: offset_center(M, h, w), then the x/y swap
        # in = L @ out + b with L = R(theta), b = R @ (t - o) + o   (pixel units, (x, y) order)
        bx = c * (tx - ox) - s * (ty - oy) + ox
        by = s * (tx - ox) + c * (ty - oy) + oy
        # normalized: n_in = A^-1 L A n_out + A^-1 (L c + b - c)
        off_x = (c * cx - s * cy + bx - cx) / ax
        off_y = (s * cx + c * cy + by - cy) / ay
        # Keras flips after warping: mirror the output x axis (n_x -> -n_x) = negate column 0.
        mirror = torch.where(params["flip"].to(rad.device), -1.0, 1.0).double()
        row0 = torch.stack([c * mirror, -s * ay / ax, off_x], dim=-1)
        row1 = torch.stack([s * ax / ay * mirror, c, off_y], dim=-1)
        return torch.stack([row0, row1], dim=1)

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Apply given transforms to a batch, deterministically (tests, report figures)."""
        _check_batch(x)
        b, _, h, w = x.shape
        if not x.is_floating_point():
            raise TypeError(f"KerasAugment needs a float batch, got {x.dtype}")
        flip = params["flip"].to(torch.bool)
        if len(flip) != b:
            raise ValueError(f"params are for {len(flip)} images, batch has {b}")
        warp = [params["theta_deg"], params["tx_px"], params["ty_px"]]
        # Keras skips the warp when theta = tx = ty = 0; doing the same keeps such images (and
        # flip-only configs) bit-exact at any size. Only checked for CPU params (no device sync).
        if all(t.device.type == "cpu" for t in warp) and not any(bool(t.any()) for t in warp):
            flip = flip.to(x.device).view(-1, 1, 1, 1)
            return torch.where(flip, x.flip(-1), x)

        channels_last = _is_channels_last(x)
        work = x if x.dtype in _FLOAT_NATIVE else x.float()  # half/bf16: sample in float32
        theta = self.theta(params, (h, w)).to(device=x.device, dtype=work.dtype)
        grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
        # bilinear = Keras order=1; border = fill_mode "nearest" (edge pixels extend outwards)
        out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = out.to(x.dtype)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out


# 32-bit integer mixer (a well-known xorshift-multiply hash); products stay below 2**59 so int64
# arithmetic never overflows, on CPU or GPU.
_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B


def _mix32_int(v: int) -> int:
    v &= _M32
    v = (((v >> 16) ^ v) * _MIX) & _M32
    v = (((v >> 16) ^ v) * _MIX) & _M32
    return (v >> 16) ^ v


def _mix32(v: Tensor) -> Tensor:
    v = v & _M32
    v = (((v >> 16) ^ v) * _MIX) & _M32
    v = (((v >> 16) ^ v) * _MIX) & _M32
    return (v >> 16) ^ v


def flip_bits(indices: Tensor, seed: int) -> Tensor:
    """A pseudo-random bit per dataset index, fixed by (seed, index): airbench's per-image pre-flip."""
    key = _mix32_int(seed)
    return (_mix32(indices.to(torch.int64) ^ key) & 1).bool()


def _reflect(i: Tensor, n: int) -> Tensor:
    # F.pad "reflect" (edge pixel not repeated): -1 -> 1, n -> n - 2; valid for |overhang| <= n - 1
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


@dataclass(frozen=True)
class FlipTranslate:
    """airbench-style augmentation: random translate by up to `pad` px plus horizontal flip.

    Equivalent to padding each image by `pad` (reflect, as airbench's `F.pad(..., 'reflect')`, or
    zeros) and cropping back to (H, W) at a per-image integer offset in [-pad, pad]^2, then
    flipping. The reflect padding is folded into the gather indices, so nothing is padded.

    `alternate_flip` is airbench's scheme: each image's flip bit is fixed by (seed, dataset index),
    and odd epochs use the opposite bit, so every image is seen both ways every two epochs.
    """

    pad: int = 2
    flip: bool = True
    alternate_flip: bool = False
    seed: int = 0
    padding_mode: str = "reflect"  # "reflect" (airbench) or "zeros"

    def __post_init__(self) -> None:
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")
        if self.padding_mode not in ("reflect", "zeros"):
            raise ValueError(f"padding_mode must be 'reflect' or 'zeros', got {self.padding_mode!r}")

    def describe(self) -> str:
        # `flip` first: with it off no image is flipped, whatever alternate_flip says (flip_mask)
        flip = "off" if not self.flip else "alternating per epoch" if self.alternate_flip else "random"
        return (
            f"flip + translate: random shift up to {self.pad} px ({self.padding_mode} padding), horizontal flip {flip}"
        )

    def __call__(
        self, x: Tensor, *, generator: torch.Generator, indices: Tensor | None = None, epoch: int = 0
    ) -> Tensor:
        """Random crop offsets and flips for a batch. `indices` (dataset indices) and `epoch` are
        needed only with `alternate_flip`."""
        _check_batch(x)
        b = x.shape[0]
        dy, dx = self.sample_offsets(b, generator)
        return self.apply(x, dy, dx, self.flip_mask(b, generator, indices=indices, epoch=epoch))

    def sample_offsets(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Per-image (dy, dx) integer offsets, uniform in [-pad, pad], on the generator's device."""
        d = torch.randint(-self.pad, self.pad + 1, (2, n), generator=generator, device=generator.device)
        return d[0], d[1]

    def flip_mask(self, n: int, generator: torch.Generator, *, indices: Tensor | None = None, epoch: int = 0) -> Tensor:
        """Which images to flip: random (p=0.5) per call, or airbench's alternating bits."""
        if not self.flip:
            return torch.zeros(n, dtype=torch.bool, device=generator.device)
        if self.alternate_flip:
            if indices is None:
                raise ValueError("alternate_flip needs the batch's dataset indices")
            if len(indices) != n:
                raise ValueError(f"got {len(indices)} indices for {n} images")
            return flip_bits(indices, self.seed) ^ bool(epoch % 2)
        return torch.rand(n, generator=generator, device=generator.device) < 0.5

    def apply(self, x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor) -> Tensor:
        """Deterministic crop at offsets (dy, dx) then flip: out[i, j] = padded_x[i + dy, j + dx]
        with padded_x[r, c] = x[r, c] inside the image, before the optional mirror of j."""
        _check_batch(x)
        b, c, h, w = x.shape
        if self.padding_mode == "reflect" and self.pad > min(h, w) - 1:
            raise ValueError(f"reflect padding needs pad < image size, got pad={self.pad} for {h}x{w}")
        dev = x.device
        dy, dx = to_device_async(torch.stack([dy, dx]), dev)  # on a GPU: one queued copy, not two that may wait
        flip = to_device_async(flip, dev).to(torch.bool)
        ar_h = torch.arange(h, device=dev)
        ar_w = torch.arange(w, device=dev)
        rows = dy[:, None] + ar_h  # (B, H) source rows, unpadded coordinates
        # flip folded into the column gather: column j of the output reads column W-1-j of the crop
        cols = dx[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)  # (B, W)
        src = x
        if self.padding_mode == "reflect":
            rows, cols = _reflect(rows, h), _reflect(cols, w)
        else:  # zeros: pad explicitly, shift indices into the padded frame
            src = F.pad(x, (self.pad,) * 4)
            rows, cols = rows + self.pad, cols + self.pad
        hs, ws = src.shape[-2:]
        if _is_channels_last(x):
            # gather on the NHWC view: the result permuted back is channels_last again
            v = src.permute(0, 2, 3, 1)
            v = v.gather(1, rows[:, :, None, None].expand(b, h, ws, c))
            v = v.gather(2, cols[:, None, :, None].expand(b, h, w, c))
            return v.permute(0, 3, 1, 2)
        out = src.gather(2, rows[:, None, :, None].expand(b, c, h, ws))
        return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


# -- registered augmentations: `--set augment=NAME` picks one; each returns the batch transform (none: None) --


@AUGMENTS.register("keras")
def keras(recipe: Any) -> KerasAugment:
    """Keras ImageDataGenerator: rotation, width/height shift, horizontal flip, fill nearest (the reference)."""
    return KerasAugment(
        recipe.rotation_range, recipe.width_shift_range, recipe.height_shift_range, recipe.horizontal_flip
    )


@AUGMENTS.register("flip_translate")
def flip_translate(recipe: Any) -> FlipTranslate:
    """airbench-style random translate (reflect padding) plus horizontal flip, optionally alternating."""
    return FlipTranslate(
        pad=recipe.translate_pad,
        flip=recipe.horizontal_flip,
        alternate_flip=recipe.alternate_flip,
        seed=recipe.seed,
    )


@AUGMENTS.register("none")
def none(recipe: Any) -> None:
    """No augmentation."""
    return None


def make_augment(recipe: Any) -> Callable | None:
    """The training-time augmentation the recipe names (an entry of `cifarlab.registry.AUGMENTS`)."""
    aug = AUGMENTS.build(recipe.augment, recipe)
    # None means "no augmentation", which only `none` may mean: from any other entry it is a factory that forgot
    # its `return`, and the run would train, silently, without the augmentation it names.
    if (aug is None and recipe.augment != "none") or (aug is not None and (isinstance(aug, type) or not callable(aug))):
        raise AUGMENTS.wrong_return(
            recipe.augment,
            aug,
            "a batch transform: an object whose __call__(x, *, generator, indices=None, epoch=0) returns the "
            "augmented float batch (only augment=none returns None)",
        )
    return aug


def describe_augment(recipe: Any) -> str:
    """One line for the report: the augmentation's own `describe()`, else its registered description."""
    aug = make_augment(recipe)
    describe = getattr(aug, "describe", None)
    return describe() if callable(describe) else AUGMENTS.describe(recipe.augment)
