"""`cifarlab export`: a run's model as ONNX or TorchScript, with its preprocessing inside the graph.

The exported model takes images as they come out of an image decoder, NCHW with values 0..255 (ONNX: uint8;
TorchScript: uint8 or float), scales them to [0, 1], applies the run's per-channel normalization and returns
softmax probabilities (at the run's fitted temperature, `cifarlab.calibrate`). Preprocessing travels with the
model, so a consumer cannot get it subtly wrong; a uint8 ONNX input also makes the classic mistake (feeding
0..1 floats) a type error instead of silent garbage.
Images must already have the run's input size (32x32 RGB for CIFAR): resizing is left to the caller (see
`cifarlab.predict` for the rule).

Exports run in fp32 eval mode with no TTA, and record class names, the input spec, mean/std, the recipe and
the cifarlab version in the file's metadata (ONNX `metadata_props`, TorchScript `_extra_files`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarlab import __version__
from cifarlab.errors import UserError
from cifarlab.files import atomic_write_bytes
from cifarlab.runs import WEIGHTS, load_run

FORMATS = ("onnx", "torchscript")
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
METADATA_FILE = "cifarlab.json"  # TorchScript _extra_files entry


class Preprocessed(nn.Module):
    """images (N, C, H, W), 0..255 -> softmax probabilities, with the exact ops of inference.to_float and the
    run's softmax temperature (`cifarlab.calibrate`; 1: none, and no division in the graph)."""

    def __init__(
        self, model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None, temperature: float = 1.0
    ) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)
        self.normalize = mean is not None and std is not None
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(list(mean) if mean else [0.0]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std) if std else [1.0]).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Same op order as inference.to_float (/255, -mean, /std) so outputs match to float rounding.
        x = images.to(torch.float32) / 255.0
        if self.normalize:
            x = (x - self.mean) / self.std
        logits = self.model(x)
        return torch.softmax(logits / self.temperature if self.temperature != 1.0 else logits, dim=1)


def weights_digest(run: Any) -> str:
    """SHA-256 of the run's model.safetensors: tells an export of these weights from a stale one (say, exported
    before the run was resumed)."""
    return hashlib.sha256((run.path / WEIGHTS).read_bytes()).hexdigest()


def metadata(run: Any, fmt: str) -> dict[str, str]:
    """String key/value metadata for the exported file (JSON for structured values)."""
    mean, std = run.normalization
    input_dtype = "uint8" if fmt == "onnx" else "uint8 or float32"
    c, h, w = run.input_shape
    return {
        "cifarlab_version": __version__,
        "recipe": run.recipe.name,
        "model": run.recipe.model,
        "run": run.path.name,
        "weights_sha256": weights_digest(run),
        "class_names": json.dumps(run.classes),
        "input": json.dumps(
            {
                "name": INPUT_NAME,
                "shape": ["batch", c, h, w],
                "layout": "NCHW",
                "color": {1: "grayscale", 3: "RGB"}.get(c, f"{c} channels"),
                "dtype": input_dtype,
                "range": [0, 255],
                "resize": f"{h}x{w}, no aspect ratio kept: Pillow BOX when shrinking, bilinear when enlarging; "
                "alpha dropped",
            }
        ),
        "preprocessing": json.dumps(
            {"scale": "x / 255", "mean": mean, "std": std, "normalize": mean is not None and std is not None}
        ),
        "output": json.dumps({"name": OUTPUT_NAME, "shape": ["batch", len(run.classes)], "kind": "softmax"}),
        "tta": "none",
        "temperature": repr(run.temperature),
    }


def _wrapped(run_dir: Path | str) -> tuple[Any, nn.Module]:
    run = load_run(run_dir)
    model = run.build_model().float().eval()  # fp32, eval mode (BN running stats, no dropout), no autocast
    model = model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # missing in torch's stubs
    mean, std = run.normalization
    wrapped = Preprocessed(model, mean, std, run.temperature).eval()
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return run, wrapped


def output_path(run_dir: Path | str, out_path: Path | str | None, fmt: str) -> Path:
    """Where `export` writes: `out_path`, a folder's default file name, or the run's own default; refused (one
    line) when it would replace one of the run's own files or something that is not a regular file."""
    if out_path is not None and not str(out_path).strip():
        raise UserError("--out is empty; give a file or folder path")
    out = Path(out_path) if out_path is not None else Path(run_dir) / DEFAULT_NAMES[fmt]
    # A folder, existing or named with a trailing slash (`--out exports/`), gets the default file name.
    if out.is_dir() or str(out_path).endswith(("/", os.sep)):
        out = out / DEFAULT_NAMES[fmt]
    if out.exists() or out.is_symlink():
        if not out.is_file():
            raise UserError(f"--out {out} exists and is not a regular file; give a file path")
        if out.resolve().parent == Path(run_dir).resolve() and out.name not in DEFAULT_NAMES.values():
            raise UserError(
                f"--out {out} is one of the run's own files; exporting over it would damage the run. Give another "
                f"path (default: {Path(run_dir) / DEFAULT_NAMES[fmt]})"
            )
        if not is_cifarlab_export(out, fmt):
            raise UserError(
                f"--out {out} exists and is not a cifarlab {fmt} export; it is left as it is. Give another path, or "
                "delete that file first"
            )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder for --out {out}: {e.strerror or e}") from None
    return out


def is_cifarlab_export(path: Path, fmt: str) -> bool:
    """Whether `path` is a file an earlier `export` wrote in `fmt` (which a new export may replace): an ONNX model
    with cifarlab's metadata, or a TorchScript archive holding cifarlab's metadata file. Read without running
    anything from the file."""
    if fmt == "onnx":
        try:
            return "cifarlab_version" in read_onnx_metadata(path)
        except Exception:  # noqa: BLE001 - not parseable as ONNX (or onnx missing): not ours
            return False
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(f"/extra/{METADATA_FILE}") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _write(out: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(out, data)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


def export_onnx(run_dir: Path | str, out_path: Path | str | None = None, opset: int = 17) -> Path:
    """Write `run_dir`'s model as ONNX (uint8 NCHW input, dynamic batch, softmax output); returns the path."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs onnx: pip install 'cifarlab[export]'") from None
    run, wrapped = _wrapped(run_dir)
    out = output_path(run_dir, out_path, "onnx")
    buf = io.BytesIO()
    dummy = torch.zeros(2, *run.input_shape, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter is deprecated but needs no extra package (the dynamo exporter needs
        # onnxscript) and handles these small conv nets exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            wrapped,
            (dummy,),
            buf,  # type: ignore[arg-type]  # torch.onnx.export writes to file objects too
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in metadata(run, "onnx").items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"cifarlab {__version__} export of run {run.path.name} (recipe {run.recipe.name})"
    onnx.checker.check_model(proto)
    _write(out, proto.SerializeToString())
    return out


def export_torchscript(run_dir: Path | str, out_path: Path | str | None = None) -> Path:
    """Write `run_dir`'s model as TorchScript (uint8 or float 0..255 NCHW input, any batch); returns the path.

    Load it with `torch.jit.load(path, _extra_files={"cifarlab.json": ""})` to read the metadata.
    """
    run, wrapped = _wrapped(run_dir)
    out = output_path(run_dir, out_path, "torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated for torch.export
        scripted = torch.jit.script(wrapped)
        buf = io.BytesIO()
        extra = {METADATA_FILE: json.dumps(metadata(run, "torchscript"), indent=2)}
        torch.jit.save(scripted, buf, _extra_files=extra)
    _write(out, buf.getvalue())
    return out


def export(run_dir: Path | str, fmt: str, out_path: Path | str | None = None) -> Path:
    if fmt == "onnx":
        return export_onnx(run_dir, out_path)
    if fmt == "torchscript":
        return export_torchscript(run_dir, out_path)
    raise UserError(f"--format {fmt!r}: accepted values: {', '.join(FORMATS)}")


def read_onnx_metadata(path: Path | str) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def read_torchscript_metadata(path: Path | str) -> dict[str, str]:
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE])
