"""`cifarlab data info` and `cifarlab data preview`: look at a dataset before training on it."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cifarlab.cli.common import data_dir_arg, fmt
from cifarlab.text import terminal_safe

DATASET_HELP = "cifar10 (default), cifar100, fashion_mnist, or the path of an ImageFolder tree (folder or .tar.gz)"


# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "inspect datasets"


def add_parser(sub: Any) -> None:
    """Register `cifarlab data` and its subcommands on `sub` (the top-level subparsers)."""
    p_data = sub.add_parser(
        "data",
        help=HELP,
        **fmt(
            "Inspect datasets: counts, checksums, sample grids.",
            "cifarlab data info --data-dir ../shared/data",
        ),
    )
    sub = p_data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    sub.required = True
    p = sub.add_parser(
        "info",
        help="source, checksum, cache, shapes, class counts and pixel statistics of a dataset",
        **fmt(
            "Show where a dataset comes from (file, MD5 and whether it is the official one, cache folder), "
            "its shapes, images per class in train and test, and the per-channel pixel mean/std of the "
            "training images. Decodes and caches the dataset on first use.",
            "cifarlab data info --data-dir ../shared/data",
        ),
    )
    _common_args(p)
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object instead of a table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "preview",
        help="PNG grid of sample images, one row per class",
        **fmt(
            "Write a PNG grid of randomly chosen images: one row per class, labelled with the class name.",
            "cifarlab data preview --data-dir ../shared/data --out preview.png --per-class 8",
        ),
    )
    _common_args(p)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("preview.png"),
        help="image to write: .png, .jpg, .pdf or .svg; the suffix picks the format (default preview.png)",
    )
    p.add_argument("--per-class", type=_per_class, default=8, help="images per class, 1 to 64 (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing the images (default 0)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="which split (default train)")
    p.set_defaults(func=cmd_preview)


def _per_class(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # argparse would say "invalid _per_class value"
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 64, got {text!r}") from None
    if not 1 <= value <= 64:  # a wider grid is unreadable, and its figure grows without bound
        raise argparse.ArgumentTypeError(f"must be from 1 to 64, got {value}")
    return value


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="cifar10", help=DATASET_HELP)
    data_dir_arg(p)
    p.add_argument(
        "--no-download",
        action="store_true",
        help="fail with advice instead of downloading when the dataset is not in the data dir",
    )


@contextlib.contextmanager
def _cli_logging() -> Iterator[None]:
    """Also show cifarlab's progress (INFO) on stderr, not only its warnings (`cli.common.cli_logging`)."""
    logger = logging.getLogger("cifarlab")
    old_level = logger.level
    logger.setLevel(min(old_level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        logger.setLevel(old_level)


def _load(args: argparse.Namespace) -> Any:
    from cifarlab.data import load_dataset

    return load_dataset(args.dataset, args.data_dir, download=not args.no_download)


def _checksum_line(ds: Any) -> str:
    if not ds.checksum:
        return "none (data given in memory)"
    status = ds.checksum_status
    if status == "official":
        return f"md5 {ds.checksum} (the official one)"
    if status == "not official":
        return f"md5 {ds.checksum} (NOT the official {ds.expected_checksum}: a re-packed or modified copy)"
    return f"md5 {ds.checksum} ({ds.checksum_kind}; no official checksum for this kind of source)"


def info_facts(ds: Any) -> dict[str, Any]:
    """Everything `data info` shows, as plain data."""
    import torch

    from cifarlab.data import channel_stats

    n_cls = len(ds.classes)
    train_counts = torch.bincount(ds.y_train, minlength=n_cls).tolist()
    test_counts = torch.bincount(ds.y_test, minlength=n_cls).tolist()
    mean, std = channel_stats(ds.x_train, for_scaling=False)  # the data as it is (a constant channel: std 0)
    return {
        "name": ds.name,
        "source": ds.source,
        "checksum": ds.checksum,
        "checksum_kind": ds.checksum_kind,
        "expected_checksum": ds.expected_checksum,
        "checksum_status": ds.checksum_status,
        "cache_dir": ds.cache_dir,
        "classes": list(ds.classes),
        "x_train_shape": list(ds.x_train.shape),
        "x_test_shape": list(ds.x_test.shape),
        "native_sizes": ds.native_sizes,  # an image folder's images by their own size, {"WxH": count}
        "train_counts": dict(zip(ds.classes, train_counts, strict=True)),
        "test_counts": dict(zip(ds.classes, test_counts, strict=True)),
        "pixel_mean": list(mean),
        "pixel_std": list(std),
    }


def cmd_info(args: argparse.Namespace) -> int:
    with _cli_logging():
        ds = _load(args)
        facts = info_facts(ds)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    # Class names and paths come from the data (folder names): escaped, so a name cannot rewrite the terminal.
    names = {c: terminal_safe(c) for c in ds.classes}
    width = max([len("class"), len("total"), *(len(n) for n in names.values())])
    lines = [
        f"dataset   {terminal_safe(ds.name)} ({len(ds.classes)} classes)",
        f"source    {terminal_safe(ds.source)}",
        f"checksum  {_checksum_line(ds)}",
        f"cache     {terminal_safe(ds.cache_dir) if ds.cache_dir else 'none (not cached)'}",
        f"train     {len(ds.x_train):>6} images  uint8 {tuple(ds.x_train.shape)}",
        f"test      {len(ds.x_test):>6} images  uint8 {tuple(ds.x_test.shape)}",
        *_sizes_lines(ds),
        "",
        f"{'class':<{width}}  {'train':>6}  {'test':>6}",
        f"{'-' * width}  {'-' * 6}  {'-' * 6}",
    ]
    for c in ds.classes:
        lines.append(f"{names[c]:<{width}}  {facts['train_counts'][c]:>6}  {facts['test_counts'][c]:>6}")
    lines += [
        f"{'-' * width}  {'-' * 6}  {'-' * 6}",
        f"{'total':<{width}}  {len(ds.x_train):>6}  {len(ds.x_test):>6}",
        "",
        "pixel statistics of the training images, "
        + {1: "one grey channel", 3: "per channel (R, G, B)"}.get(len(facts["pixel_mean"]), "per channel")
        + ", in [0, 1] units:",
        "  mean  " + "  ".join(f"{v:.4f}" for v in facts["pixel_mean"]),
        "  std   " + "  ".join(f"{v:.4f}" for v in facts["pixel_std"]),
    ]
    print("\n".join(lines))
    return 0


def _sizes_lines(ds: Any) -> list[str]:
    """An image folder's own image sizes (most common first, up to 6) and what loading made of them."""
    if not ds.native_sizes:
        return []
    ranked = sorted(ds.native_sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{k} ({n})" for k, n in ranked[:6]) + (f", {len(ranked) - 6} more" if len(ranked) > 6 else "")
    _, _, h, w = ds.x_train.shape if len(ds.x_train) else ds.x_test.shape
    same = len(ranked) == 1 and ranked[0][0] == f"{w}x{h}"
    return [f"files     {shown}" + ("" if same else f"; loaded as {w}x{h}")]


# What a file already at --out must start with to be replaced: an image of the kind the suffix names (what an
# earlier preview wrote), never a text file or anything else that happens to have that name.
_SIGNATURES = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpg": (b"\xff\xd8\xff",),
    "jpeg": (b"\xff\xd8\xff",),
    "pdf": (b"%PDF-",),
    "svg": (b"<?xml", b"<svg"),
}


def _is_image_of_kind(path: Path, kind: str) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(1024)
    except OSError:
        return False
    if kind == "svg":  # matplotlib's SVG: an XML declaration, then the <svg> element
        return head.lstrip().startswith(_SIGNATURES["svg"]) and b"<svg" in head
    return head.startswith(_SIGNATURES[kind])


def _check_out(out: Path, kind: str) -> None:
    """Refuse, before the data is read, an --out that would replace something that is not an image of its kind
    (see `_SIGNATURES`), or that lies in a folder marked read-only: `writable_dir`'s rule, which holds for root
    too, as for the cache (a shared data folder is r-x, and root would otherwise write into it)."""
    from cifarlab.data.cache import writable_dir
    from cifarlab.errors import UserError

    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} exists and is not a regular file; give a file path")
    if out.is_file() and not _is_image_of_kind(out, kind):
        raise UserError(
            f"--out {out} exists and is not a {kind.upper()} image; it is left as it is. Give another path, or "
            "delete that file first"
        )
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:  # a missing folder is made in the nearest existing one
        folder = folder.parent
    if folder.is_dir() and not writable_dir(folder):  # an existing folder: checked, nothing made
        raise UserError(f"cannot write {out}: {folder} is read-only (not writable). Choose another --out.")


def cmd_preview(args: argparse.Namespace) -> int:
    import torch

    from cifarlab.data import sample_grid_figure
    from cifarlab.errors import UserError

    out: Path = args.out
    kinds = {"png", "jpg", "jpeg", "pdf", "svg"}
    kind = out.suffix.lower().lstrip(".")
    if kind not in kinds:
        what = "has no suffix" if not kind else f"has the suffix {out.suffix}"
        raise UserError(f"--out {out} {what}: write a .png, .jpg, .pdf or .svg file (the suffix picks the format)")
    _check_out(out, kind)
    with _cli_logging():
        ds = _load(args)
    x, y = (ds.x_train, ds.y_train) if args.split == "train" else (ds.x_test, ds.y_test)
    counts = torch.bincount(y, minlength=len(ds.classes)).tolist()
    # A class may have no images in a split (an image folder's test/ need not hold every class): its row stays
    # blank and says so, and the classes that have images set how many columns there are.
    empty = [c for c, n in zip(ds.classes, counts, strict=True) if n == 0]
    if len(empty) == len(ds.classes):
        raise UserError(f"{ds.name} has no {args.split} images to preview; try the other --split")
    smallest = min(n for n in counts if n > 0)
    per_class = min(args.per_class, smallest)  # a class with fewer images would leave blank cells
    labels = [f"{c} (no {args.split} images)" if n == 0 else c for c, n in zip(ds.classes, counts, strict=True)]
    fig = sample_grid_figure(x, y, labels, per_class=per_class, seed=args.seed)
    fig.suptitle(f"{ds.name} ({args.split}): {per_class} random images per class (seed {args.seed})")
    existed = out.is_file()
    try:
        if out.parent != Path(""):
            out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="jpg" if kind == "jpeg" else kind)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}. Choose another --out.") from exc
    smallest_text = f"the smallest class has {smallest} {args.split} image{'' if smallest == 1 else 's'}"
    notes = [smallest_text] if per_class < args.per_class else []
    if empty:
        shown = ", ".join(terminal_safe(c) for c in empty[:5]) + (
            f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        )
        notes.append(f"blank rows: no {args.split} images of {shown}")
    note = f" ({'; '.join(notes)})" if notes else ""
    print(
        f"{'replaced' if existed else 'wrote'} {terminal_safe(out)} ({len(ds.classes)} classes x {per_class} "
        f"image{'' if per_class == 1 else 's'}"
        f"{note}, {args.split} split)"
    )
    return 0
