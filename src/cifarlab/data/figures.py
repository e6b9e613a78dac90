"""Figures of a dataset: a seeded grid of sample images, one row per class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from cifarlab.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["sample_grid_figure"]


def sample_grid_figure(
    x_uint8: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    classes: Sequence[str],
    per_class: int = 8,
    seed: int = 0,
) -> Figure:
    """A grid of random sample images: one row per class (class name as the row label), `per_class` columns.

    Images are uint8 ``(N, C, H, W)`` with C = 1 (gray), 3 (RGB) or 4 (RGBA, alpha not shown); the choice
    is seeded. Draws one mosaic (fast even for 100 classes).
    Uses matplotlib's object API (no pyplot state); save with ``fig.savefig(path)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = torch.as_tensor(x_uint8).cpu()
    labels = torch.as_tensor(y).long().cpu()
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise ValueError(f"x_uint8 must be uint8 (N, C, H, W) with C in 1, 3, 4, got {x.dtype} {tuple(x.shape)}")
    x = x[:, :3]
    if per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    n_cls = len(classes)
    h, w = x.shape[2], x.shape[3]
    pad = max(1, h // 16)
    mosaic = np.full((n_cls * (h + pad) - pad, per_class * (w + pad) - pad, 3), 255, dtype=np.uint8)
    g = torch.Generator().manual_seed(int(seed))
    for c in range(n_cls):
        members = (labels == c).nonzero().flatten()
        pick = members[torch.randperm(len(members), generator=g)[:per_class]]
        for j, i in enumerate(pick.tolist()):
            top, left = c * (h + pad), j * (w + pad)
            mosaic[top : top + h, left : left + w] = x[i].expand(3, h, w).permute(1, 2, 0).numpy()
    cell = 0.7 if n_cls <= 20 else max(0.25, 14.0 / n_cls)  # inches per image; tall sets get smaller cells
    label_w = 0.09 * max((len(c) for c in classes), default=4) + 0.3
    fig = Figure(figsize=(per_class * cell + label_w + 0.2, n_cls * cell + 0.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg: renders PNGs without a display, independent of pyplot's backend
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest")
    # parse_math=False: class names are shown as they are, never as mathtext ("$\foo$" would crash the drawing).
    ax.set_yticks([c * (h + pad) + h / 2 - 0.5 for c in range(n_cls)], labels=list(classes), parse_math=False)
    ax.set_xticks([])
    ax.tick_params(axis="y", length=0, labelsize=9 if n_cls <= 20 else 6)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig
