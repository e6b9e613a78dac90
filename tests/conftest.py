"""Shared test fixtures: tiny synthetic datasets in the exact on-disk layouts cifarlab reads, and isolation.

Every test runs with ``$CIFARLAB_DATA`` and ``$CIFARLAB_CACHE`` pointing at empty temporary folders and with
`cifarlab.data`'s URL opener replaced by one that refuses: no test can read the user's data, write to
``~/.cache`` or touch the network by accident.

Fixtures for other test modules:

- ``tiny_cifar10``: ``data_dir/cifar-10-python.tar.gz`` in the official layout (5 x 10 train, 10 test images,
  every class present); ``load_dataset("cifar10", t.data_dir)`` loads it (with a ChecksumWarning: its MD5 is
  not the official one). Expected arrays are on the returned `TinyCifar`.
- ``tiny_cifar10_extracted``: the same as an extracted ``cifar-10-batches-py/`` folder (no warning).
- ``tiny_imagefolder`` / ``tiny_imagefolder_tar``: ``root/{train,test}/{cat,dog,frog}/`` with solid-colour
  images of assorted sizes, modes and formats, as a folder or a ``.tar.gz``.

- ``undrawn_figures``: reports build every figure without rasterizing it (a noise PNG instead), for tests of
  what a report says; ``once`` / ``report_built``: results built once per pytest run, shared by xdist workers.

The builder functions (``write_cifar_archive``, ``write_imagefolder``, ``tar_tree``) take parameters for
tests that need other sizes. Tests marked ``long`` are collected first (`pytest_collection_modifyitems`).

Each test process runs on one core (`pytest_configure`): the serial run on the first core it may use, each
pytest-xdist worker (``make test`` runs ``-n 2``) on a core of its own. Training sets torch's threads to the
cores it may use, and the subprocesses tests start inherit the affinity, so every tiny model trains on one
thread: two threads on two busy cores made them 10-30x slower (OpenMP threads waiting for each other).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# The cores this test process could use before pytest_configure pinned it to one.
ALL_CORES: set[int] = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()


def pytest_configure(config: pytest.Config) -> None:
    """Pin this test process to one core (see the module docstring) before anything imports torch."""
    if not ALL_CORES:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... in a pytest-xdist worker
    if worker is None and getattr(config.option, "numprocesses", None):
        return  # the pytest-xdist controller: it only hands out tests; its workers inherit its affinity
    cores = sorted(ALL_CORES)
    index = int(worker.removeprefix("gw")) if worker and worker.removeprefix("gw").isdigit() else 0
    os.sched_setaffinity(0, {cores[index % len(cores)]})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `long` first (each keeps its place among them): pytest-xdist's workers then take the
    short ones last and finish together, instead of one waiting for another's 30-second test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture(scope="session", autouse=True)
def _shared_data_untouched() -> Iterator[None]:
    """The shared data folder beside the checkout is read, never written: no cache, no __pycache__, no change."""
    if not SHARED_DATA.is_dir():
        yield
        return
    before = _listing(SHARED_DATA)
    yield
    after = _listing(SHARED_DATA)
    assert after == before, f"the tests changed {SHARED_DATA}: {sorted(set(after) ^ set(before))}"


@pytest.fixture(autouse=True)
def _cifarlab_isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path_factory.mktemp("cifarlab-env")
    monkeypatch.setenv("CIFARLAB_DATA", str(base / "data"))
    monkeypatch.setenv("CIFARLAB_CACHE", str(base / "cache"))

    def no_network(url: str) -> None:
        raise OSError(f"network access is disabled in tests (tried {url})")

    monkeypatch.setattr("cifarlab.data.official._open_url", no_network)


# -- official "python version" archives ------------------------------------------------------------


@dataclass
class TinyCifar:
    data_dir: Path  # the folder to pass as data_dir
    path: Path  # the archive (or extracted folder)
    md5: str  # of the archive ("" for an extracted folder)
    classes: tuple[str, ...]
    x_train: np.ndarray  # (N, 3, 32, 32) uint8, as load_dataset must return it
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray


def planar_rows(x_nhwc: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 pictures -> N x 3072 official rows (R plane, G plane, B plane, each row-major)."""
    return np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2).reshape(len(x_nhwc), -1))


def _images(n: int, n_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.permutation(np.arange(n) % n_classes).astype(np.int64)  # every class present when n >= n_classes
    return x, y


def official_files(
    kind: str = "cifar10", n_per_batch: int = 10, n_test: int = 10, seed: int = 0, python2: bool = False
) -> tuple[dict[str, bytes], TinyCifar]:
    """The pickled files of an official archive ({name: bytes}) and what loading them must give.

    `python2` writes them the way the real archive was written (Python 2 cPickle: str keys, numpy 1 names).
    """
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        classes = CIFAR10_NAMES
        train_names = [f"data_batch_{i}" for i in range(1, 6)]
        test_name, meta_name, label_key = "test_batch", "batches.meta", b"labels"
        meta = {
            b"label_names": [c.encode() for c in classes],
            b"num_cases_per_batch": n_per_batch,
            b"num_vis": 3072,
        }
    elif kind == "cifar100":
        classes = tuple(f"fine{i:02d}" for i in range(100))
        train_names, test_name, meta_name, label_key = ["train"], "test", "meta", b"fine_labels"
        meta = {
            b"fine_label_names": [c.encode() for c in classes],
            b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)],
        }
    else:
        raise ValueError(kind)
    files = {meta_name: _py2_dict(meta) if python2 else pickle.dumps(meta, protocol=2)}
    xs, ys = [], []
    for name in train_names:
        n = n_per_batch * (5 if kind == "cifar100" else 1)
        x, y = _images(n, len(classes), rng)
        files[name] = _batch_pickle(x, y, label_key, name, python2)
        xs.append(x)
        ys.append(y)
    x_te, y_te = _images(n_test, len(classes), rng)
    files[test_name] = _batch_pickle(x_te, y_te, label_key, test_name, python2)
    x_tr = np.concatenate(xs)
    expected = TinyCifar(
        data_dir=Path(),
        path=Path(),
        md5="",
        classes=classes,
        x_train=np.ascontiguousarray(x_tr.transpose(0, 3, 1, 2)),
        y_train=np.concatenate(ys),
        x_test=np.ascontiguousarray(x_te.transpose(0, 3, 1, 2)),
        y_test=y_te,
    )
    return files, expected


def _batch_pickle(x_nhwc: np.ndarray, y: np.ndarray, label_key: bytes, name: str, python2: bool = False) -> bytes:
    if python2:
        return _py2_dict({label_key: y.tolist(), b"data": planar_rows(x_nhwc), b"batch_label": name.encode()})
    d = {
        b"batch_label": name.encode(),
        label_key: y.tolist(),
        b"data": planar_rows(x_nhwc),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(y))],
    }
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = (y % 20).tolist()
    return pickle.dumps(d, protocol=2)  # protocol 2, like the official files and build_cifar10.py


def _py2_dict(d: dict) -> bytes:
    """Pickle a dict of bytes/int/list/uint8-2D-array exactly as Python 2's cPickle (protocol 2) would:
    bytes become Python 2 str opcodes and the array names numpy.core.multiarray (numpy 1)."""

    def s(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: what Python 3 reads back with `encoding`
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def i(v: int) -> bytes:  # BININT1 / BININT2
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    def value(v) -> bytes:
        if isinstance(v, bytes):
            return s(v)
        if isinstance(v, int):
            return i(v)
        if isinstance(v, list):
            return b"](" + b"".join(value(e) for e in v) + b"e"
        assert isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 2
        dtype = b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
        dtype += b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        arr = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        return arr + b"(K\x01" + i(v.shape[0]) + i(v.shape[1]) + b"\x86" + dtype + b"\x89" + s(v.tobytes()) + b"tb"

    return b"\x80\x02}(" + b"".join(s(k) + value(v) for k, v in d.items()) + b"u."


def folder_name(kind: str) -> str:
    return {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[kind]


def archive_name(kind: str) -> str:
    return {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[kind]


def write_cifar_archive(
    data_dir: Path,
    kind: str = "cifar10",
    n_per_batch: int = 10,
    n_test: int = 10,
    seed: int = 0,
    extracted: bool = False,
    files: dict[str, bytes] | None = None,
    python2: bool = False,
) -> TinyCifar:
    """Write an official-layout archive (or, with `extracted`, its folder) into `data_dir`.

    `files` overrides the pickled members (e.g. to plant a corrupt or malicious one).
    """
    built, t = official_files(kind, n_per_batch, n_test, seed, python2)
    built.update(files or {})
    data_dir.mkdir(parents=True, exist_ok=True)
    top = folder_name(kind)
    t.data_dir = data_dir
    if extracted:
        (data_dir / top).mkdir(exist_ok=True)
        for name, raw in built.items():
            (data_dir / top / name).write_bytes(raw)
        t.path = data_dir / top
        return t
    t.path = data_dir / archive_name(kind)
    with tarfile.open(t.path, "w:gz") as tar:
        info = tarfile.TarInfo(top)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        for name, raw in built.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    t.md5 = hashlib.md5(t.path.read_bytes()).hexdigest()
    return t


@pytest.fixture
def tiny_cifar10(tmp_path: Path) -> TinyCifar:
    return write_cifar_archive(tmp_path / "data", "cifar10")


@pytest.fixture
def tiny_cifar10_extracted(tmp_path: Path) -> TinyCifar:
    return write_cifar_archive(tmp_path / "data", "cifar10", extracted=True)


# -- ImageFolder trees -----------------------------------------------------------------------------

# class -> solid RGB colour of all its images
FOLDER_COLOURS: dict[str, tuple[int, int, int]] = {
    "cat": (200, 30, 40),
    "dog": (20, 180, 60),
    "frog": (90, 70, 220),
}


@dataclass
class TinyFolder:
    root: Path  # the tree root (or the .tar.gz)
    classes: tuple[str, ...]
    colours: dict[str, tuple[int, int, int]]
    counts: dict[str, dict[str, int]]  # split -> class -> images


# (split, file name, size (w, h), mode, format): assorted sizes, modes and formats in every class
_FOLDER_FILES = (
    ("train", "a_big.png", (64, 48), "RGB", "PNG"),
    ("train", "b_small.png", (16, 16), "RGB", "PNG"),
    ("train", "c_exact.jpg", (32, 32), "RGB", "JPEG"),
    ("train", "d_alpha.png", (40, 40), "RGBA", "PNG"),
    ("test", "e_box.bmp", (33, 31), "RGB", "BMP"),
    ("test", "f_lossless.webp", (48, 64), "RGB", "WEBP"),
)


def write_imagefolder(root: Path, colours: dict[str, tuple[int, int, int]] | None = None) -> TinyFolder:
    """root/{train,test}/<class>/ with solid-colour images (see _FOLDER_FILES); returns what to expect."""
    from PIL import Image

    colours = dict(colours or FOLDER_COLOURS)
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for cls, rgb in colours.items():
        for split, fname, size, mode, fmt in _FOLDER_FILES:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            img = Image.new(mode, size, rgb + ((255,) if mode == "RGBA" else ()))
            kwargs = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
            img.save(d / fname, fmt, **kwargs)
            counts[split][cls] = counts[split].get(cls, 0) + 1
    return TinyFolder(root=root, classes=tuple(sorted(colours)), colours=colours, counts=counts)


def tar_tree(src: Path, dest: Path, arcname: str | None = None) -> Path:
    """`src` as a .tar.gz whose single top folder is `arcname` (default: src's name)."""
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=arcname or src.name)
    return dest


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> TinyFolder:
    return write_imagefolder(tmp_path / "tinyfolder")


@pytest.fixture
def tiny_imagefolder_tar(tmp_path: Path) -> TinyFolder:
    t = write_imagefolder(tmp_path / "src" / "tinyfolder")
    t.root = tar_tree(t.root, tmp_path / "tinyfolder.tar.gz")
    return t


@contextlib.contextmanager
def _every_core() -> Iterator[None]:
    if not ALL_CORES:
        yield
        return
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, ALL_CORES)
    try:
        yield
    finally:
        os.sched_setaffinity(0, pinned)


# Tests whose own worker processes get every core (the processes they start inherit it): two `cifarlab tune`
# workers, each training, on the one core of their xdist worker took twice as long.
SPREAD_OVER_EVERY_CORE = {"test_two_workers_killed_mid_study_resume_without_losing_or_repeating_a_trial"}


@pytest.fixture(autouse=True)
def _worker_processes_spread(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.name in SPREAD_OVER_EVERY_CORE:
        with _every_core():
            yield
    else:
        yield


@pytest.fixture
def cpu_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    """`device="auto"` resolves to the CPU: for tests that compare cifarlab's inference with a computation done
    here on the CPU to 1e-4 (on a GPU, fp32 convolutions run in TF32, ~1e-3 apart)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: on 2 busy cores two threads made tiny models ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- a built report --------------------------------------------------------------------------------------------


class Once:
    """`once(name, build)`: `build(folder)`'s result, built once per `pytest` run, not once per test process.

    Under pytest-xdist, worksteal often splits a module over both workers, and each would build that module's
    (and the session's) fixtures again: a report takes ~10 s. The first worker to need one builds it, under a
    file lock, into a folder of the run's shared temporary folder, and pickles the result; the others wait for
    it and unpickle it (the same folder: copy it before changing anything in it). Serially, or without file
    locks, it simply builds."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.factory = tmp_path_factory

    def __call__(self, name: str, build: Callable[[Path], T]) -> T:
        if os.environ.get("PYTEST_XDIST_WORKER") is None or fcntl is None:
            return build(self.factory.mktemp(name))
        shared = self.factory.getbasetemp().parent / "built-once"  # every worker's basetemp is in that parent
        shared.mkdir(exist_ok=True)
        with open(shared / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            done = shared / f"{name}.pickle"
            if not done.exists():
                folder = shared / name
                folder.mkdir()
                done.write_bytes(pickle.dumps(build(folder)))
            return pickle.loads(done.read_bytes())


@pytest.fixture(scope="session")
def once(tmp_path_factory: pytest.TempPathFactory) -> Once:
    return Once(tmp_path_factory)


@pytest.fixture(scope="session")
def report_built(once: Once) -> tuple[Path, dict]:
    """(run folder, metrics) of one full report (test_report.make_report_run with steps.csv and
    eval_corruptions.json), built once (`Once`): drawing its figures takes ~10 s. test_report.py and
    test_report_browser.py read it; copy the folder before changing anything in it."""
    from cifarlab.report import build_report
    from test_report import make_report_run

    def build(parent: Path) -> tuple[Path, dict]:
        run_dir, ds = make_report_run(parent, steps=True, corruptions=True)
        return run_dir, build_report(run_dir, dataset=ds)

    return once("report", build)


@functools.lru_cache(maxsize=1)
def _noise_png() -> bytes:
    """A 160 x 120 PNG of random pixels: incompressible, ~58 kB, about the size of a drawn figure."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, "png")
    return buf.getvalue()


@pytest.fixture
def undrawn_figures(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Reports build every figure but do not rasterize them: each comes out as the same noise PNG (returned).

    For tests of what happens around the drawing (full disks, what a report says): rasterizing and encoding
    ~15 figures at 2x is most of a report's ~7 s. The report fixtures of test_report.py draw for real."""
    return skip_rasterizing(monkeypatch)


def skip_rasterizing(mp: pytest.MonkeyPatch) -> bytes:
    """What `undrawn_figures` does, for module-scoped fixtures (with `pytest.MonkeyPatch.context()`)."""
    png = _noise_png()
    mp.setattr("cifarlab.report.figures.png_bytes", lambda fig: png)
    return png
