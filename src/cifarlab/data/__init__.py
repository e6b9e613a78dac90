"""Datasets: loading CIFAR-10/100, ImageFolder trees and in-memory arrays into a uint8 `Dataset`, then
splits, statistics and `BatchLoader` batches.

Where things live:

- `images`: the image suffixes, the decompression-bomb guard, decoding to uint8 CHW (simplejpeg for JPEGs at
  their final size, Pillow for the rest).
- `archives`: reading tarballs to the end so a damaged one is detected (gzip/bzip2/xz checksums).
- `official`: official CIFAR archives (download, MD5, safe unpickling of the batches).
- `imagefolder`: ImageFolder trees and tarballs.
- `arrays`: `from_arrays` and `from_torch_dataset` for data already in memory.
- `cache`: the decoded-data cache and where it lives.
- `dataset`: the `Dataset` dataclass and `load_dataset`.
- `loader`: `split_indices`, `recipe_split`, `channel_stats`, scaling, `BatchLoader`.
- `figures`: `sample_grid_figure`.
"""

from __future__ import annotations

from cifarlab.data.arrays import as_images, from_arrays, from_torch_dataset
from cifarlab.data.cache import resolve_cache_dir
from cifarlab.data.dataset import Dataset, default_data_dir, load_dataset
from cifarlab.data.figures import sample_grid_figure
from cifarlab.data.imagefolder import DEFAULT_IMAGE_SIZE
from cifarlab.data.images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, decode_image
from cifarlab.data.loader import (
    BatchLoader,
    channel_stats,
    recipe_split,
    scale_images,
    scaling_constants,
    split_indices,
)
from cifarlab.data.official import (
    CIFAR10_CLASSES,
    OFFICIAL,
    ChecksumWarning,
    OfficialArchive,
    _open_url,  # noqa: F401 (the download opener tests/conftest.py replaces; see official._default_opener)
    download_url,
    file_md5,
)

__all__ = [
    "CIFAR10_CLASSES",
    "DEFAULT_IMAGE_SIZE",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "OFFICIAL",
    "BatchLoader",
    "ChecksumWarning",
    "Dataset",
    "OfficialArchive",
    "as_images",
    "channel_stats",
    "decode_image",
    "default_data_dir",
    "download_url",
    "file_md5",
    "from_arrays",
    "from_torch_dataset",
    "load_dataset",
    "resolve_cache_dir",
    "sample_grid_figure",
    "scale_images",
    "scaling_constants",
    "recipe_split",
    "split_indices",
]
