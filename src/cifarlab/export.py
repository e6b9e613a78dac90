"""`cifarlab export`: a run's model as ONNX or TorchScript, with its preprocessing inside the graph.

The exported model takes images as they come out of an image decoder, NCHW with values 0..255 (ONNX: uint8;
TorchScript: uint8 or float), scales them to [0, 1], applies the run's per-channel normalization, averages the
logits of the test-time augmentation views and returns softmax probabilities (at the run's fitted temperature,
`cifarlab.calibrate`). Preprocessing travels with the model, so a consumer cannot get it subtly wrong; a uint8
ONNX input also makes the classic mistake (feeding 0..1 floats) a type error instead of silent garbage.
Images must already have the run's input size (32x32 RGB for CIFAR): resizing is left to the caller (see
`cifarlab.predict` for the rule).

Exports run in fp32 eval mode with the run's test-time augmentation inside the graph (`recipe.tta`, as its test
accuracy, `evaluate`, `predict` and `serve` use it; `tta="none"` exports the bare model, one forward pass instead
of 2 or 6), and record class names, the input spec, mean/std, the TTA, the recipe and the cifarlab version in the
file's metadata (ONNX `metadata_props`, TorchScript `_extra_files`).
"""

from __future__ import annotations

import io
import json
import os
import threading
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import __version__
from cifarlab.data import scaling_constants
from cifarlab.errors import UserError
from cifarlab.files import atomic_write_bytes
from cifarlab.recipes import TTA
from cifarlab.runs import CONFIG, WEIGHTS, load_run, weights_sha256

FORMATS = ("onnx", "torchscript")
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
METADATA_FILE = "cifarlab.json"  # TorchScript _extra_files entry
TTA_MODES: tuple[str, ...] = get_args(TTA)  # what `recipe.tta` accepts: none, flip, flip_translate


class Preprocessed(nn.Module):
    """images (N, C, H, W), 0..255 -> softmax probabilities, with the exact ops of inference.to_float, the
    test-time augmentation `tta` of inference.tta_views and predict_logits, and the run's softmax temperature
    (`cifarlab.calibrate`; 1: none, and no division in the graph)."""

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        temperature: float = 1.0,
        tta: str = "none",
    ) -> None:
        super().__init__()
        if tta not in TTA_MODES:
            raise UserError(f"--tta {tta!r}: accepted values: {', '.join(TTA_MODES)}")
        self.model = model
        self.temperature = float(temperature)
        self.tta = tta
        self.normalize = mean is not None and std is not None
        # inference.to_float's constants: x * scale + shift == (x / 255 - mean) / std, so the graph's inputs to the
        # model are bit-identical to `predict`'s.
        scale, shift = scaling_constants(mean, std, len(mean) if mean else 1)
        self.scale: torch.Tensor
        self.shift: torch.Tensor
        self.register_buffer("scale", scale if scale is not None else torch.ones(1, 1, 1, 1))
        self.register_buffer("shift", shift if shift is not None else torch.zeros(1, 1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        # scale_images' ops, out of place: a float32 input is the caller's own tensor, not a copy.
        x = x * self.scale + self.shift if self.normalize else x / 255.0
        logits = self.tta_logits(x)
        return torch.softmax(logits / self.temperature if self.temperature != 1.0 else logits, dim=1)

    def tta_logits(self, x: torch.Tensor) -> torch.Tensor:
        """inference.tta_views + predict_logits spelled out (TorchScript compiles no generator): the same views,
        weights and order of the sums, so the outputs match `predict`'s to float rounding."""
        if self.tta == "none":
            return self.model(x)  # predict_logits' `* 1.0` changes no bit
        w = 0.5 if self.tta == "flip" else 0.25
        acc = self.model(x) * w + self.model(x.flip(-1)) * w
        if self.tta == "flip_translate":
            padded = F.pad(x, [1, 1, 1, 1], mode="reflect")  # ONNX Pad, mode reflect
            # Shifted one pixel down-right and up-left; slices from the ends, so the graph needs no Shape op.
            for view in [padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]]:
                acc = acc + self.model(view) * 0.125
                acc = acc + self.model(view.flip(-1)) * 0.125
        return acc


_ONNX_EXPORT = threading.Lock()  # see export_onnx


def resolve_tta(run: Any, tta: str | None) -> str:
    """The TTA an export carries: the run's recipe's for None or "recipe", else `tta` (checked)."""
    chosen = run.recipe.tta if tta in (None, "recipe") else tta
    if chosen not in TTA_MODES:
        raise UserError(f"--tta {tta!r}: accepted values: recipe, {', '.join(TTA_MODES)}")
    return str(chosen)


def weights_digest(run: Any) -> str:
    """SHA-256 of the run's model.safetensors: tells an export of these weights from a stale one (say, exported
    before the run was resumed)."""
    digest = weights_sha256(run.path)
    if digest is None:
        raise UserError(f"{run.path / WEIGHTS} cannot be read; the run has no weights to export")
    return digest


def metadata(run: Any, fmt: str, tta: str = "none") -> dict[str, str]:
    """String key/value metadata for the exported file (JSON for structured values); `tta`: the one in the graph."""
    mean, std = run.normalization
    input_dtype = "uint8" if fmt == "onnx" else "uint8 or float32"
    c, h, w = run.input_shape
    return {
        "cifarlab_version": __version__,
        "recipe": run.recipe.name,
        "model": run.recipe.model,
        "run": run.path.resolve().name,  # resolved: `export .` from inside the run folder names it too
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
        "tta": tta,
        "temperature": repr(run.temperature),
    }


def _wrapped(run_dir: Path | str, tta: str | None) -> tuple[Any, Preprocessed]:
    run = load_run(run_dir)
    model = run.build_model().float().eval()  # fp32, eval mode (BN running stats, no dropout), no autocast
    model = model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # missing in torch's stubs
    mean, std = run.normalization
    wrapped = Preprocessed(model, mean, std, run.temperature, resolve_tta(run, tta)).eval()
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return run, wrapped


def output_path(run_dir: Path | str, out_path: Path | str | None, fmt: str) -> Path:
    """Where `export` writes: `out_path`, a folder's default file name, or the run's own default; refused (one
    line) when it would replace one of the run's own files, something that is not a regular file or an earlier
    cifarlab export, or another run's export in that run's folder."""
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
        meta = read_export_metadata(out, fmt)
        if meta is None:
            raise UserError(
                f"--out {out} exists and is not a cifarlab {fmt} export; it is left as it is. Give another path, or "
                "delete that file first"
            )
        this, owner, home = Path(run_dir).resolve(), meta.get("run"), out.resolve().parent
        if owner and owner != this.name and home != this and (home / CONFIG).is_file():
            # Another run's own export (what `serve --backend onnx` and users of that run pick up): not ours to replace.
            whose = (
                f"run {owner}'s own export"
                if owner == home.name
                else f"run {owner}'s export in run {home.name}'s folder"
            )
            raise UserError(
                f"--out {out} is {whose}; exporting run {this.name} would replace it. Give another path "
                f"(default: {Path(run_dir) / DEFAULT_NAMES[fmt]})"
            )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder for --out {out}: {e.strerror or e}") from None
    return out


def read_export_metadata(path: Path, fmt: str) -> dict[str, str] | None:
    """The metadata of a file an earlier `export` wrote in `fmt`, None for any other file: an ONNX model with
    cifarlab's metadata, or a TorchScript archive holding cifarlab's metadata file. Read without running
    anything from the file."""
    if fmt == "onnx":
        try:
            meta = read_onnx_metadata(path)
        except Exception:  # noqa: BLE001 - not parseable as ONNX (or onnx missing): not ours
            return None
        return meta if "cifarlab_version" in meta else None
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith(f"/extra/{METADATA_FILE}")), None)
            if name is None:
                return None
            try:
                meta = json.loads(z.read(name))
            except ValueError:  # ours, but its metadata is damaged: still an export a new one may replace
                return {}
    except (OSError, zipfile.BadZipFile):
        return None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def is_cifarlab_export(path: Path, fmt: str) -> bool:
    """Whether `path` is a file an earlier `export` wrote in `fmt` (which a new export may replace)."""
    return read_export_metadata(path, fmt) is not None


def _write(out: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(out, data)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


def export_onnx(
    run_dir: Path | str, out_path: Path | str | None = None, opset: int = 17, tta: str | None = "recipe"
) -> Path:
    """Write `run_dir`'s model as ONNX (uint8 NCHW input, dynamic batch, softmax output); returns the path.
    `tta`: "recipe" (the run's `recipe.tta`), "none", "flip" or "flip_translate"."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs onnx: pip install 'cifarlab[export]'") from None
    run, wrapped = _wrapped(run_dir, tta)
    out = output_path(run_dir, out_path, "onnx")
    buf = io.BytesIO()
    dummy = torch.zeros(2, *run.input_shape, dtype=torch.uint8)
    # torch.onnx.export keeps process-wide state (and warnings filters are process-wide too): one export at a time
    with _ONNX_EXPORT, warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter is deprecated but needs no extra package (the dynamo exporter needs
        # onnxscript) and handles these small conv nets exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # A TTA flip is a Slice with step -1 of the input: nothing there to fold, and the exporter says so.
        warnings.filterwarnings("ignore", message=".*Only steps=1 can be constant folded.*")
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
    for key, value in metadata(run, "onnx", wrapped.tta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"cifarlab {__version__} export of run {run.path.resolve().name} (recipe {run.recipe.name})"
    onnx.checker.check_model(proto)
    _write(out, proto.SerializeToString())
    return out


def export_torchscript(run_dir: Path | str, out_path: Path | str | None = None, tta: str | None = "recipe") -> Path:
    """Write `run_dir`'s model as TorchScript (uint8 or float 0..255 NCHW input, any batch); returns the path.
    `tta` as for `export_onnx`.

    Load it with `torch.jit.load(path, _extra_files={"cifarlab.json": ""})` to read the metadata.
    """
    run, wrapped = _wrapped(run_dir, tta)
    out = output_path(run_dir, out_path, "torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated for torch.export
        scripted = torch.jit.script(wrapped)
        buf = io.BytesIO()
        extra = {METADATA_FILE: json.dumps(metadata(run, "torchscript", wrapped.tta), indent=2)}
        torch.jit.save(scripted, buf, _extra_files=extra)
    _write(out, buf.getvalue())
    return out


def export(run_dir: Path | str, fmt: str, out_path: Path | str | None = None, tta: str | None = "recipe") -> Path:
    """`export_onnx` or `export_torchscript` by `fmt`; `tta`: "recipe" (the run's), "none", "flip" or
    "flip_translate"."""
    if fmt == "onnx":
        return export_onnx(run_dir, out_path, tta=tta)
    if fmt == "torchscript":
        return export_torchscript(run_dir, out_path, tta=tta)
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
