"""Fine-tuning: start a run from trained weights (`cifarlab train --init SOURCE`, `cifarlab.fit(init=SOURCE)`).

SOURCE is a run folder (its ``model.safetensors``, classes and input shape), a ``.safetensors`` file, or a
PyTorch state-dict file read with ``torch.load(weights_only=True)`` (a file holding arbitrary pickled objects
is refused, never unpickled). The rules, applied by `apply_init`:

- Every tensor with the same name and shape as the model's is loaded.
- The classifier head (the tensors whose shape follows the number of classes) is made new when the classes
  differ (their names, for a run folder; their number, for a bare file); it is skipped and reported.
- When the input shape differs (CIFAR's 3x32x32 -> Fashion-MNIST's 1x28x28), the tensors whose shape follows
  it are found by building the same architecture for the source's input shape (on the meta device). A conv
  reading the image directly is adapted: 3 -> 1 channels by summing its kernels over the input channels (a
  grey image then gives exactly what the source gave for R = G = B), 1 -> C by repeating them divided by C.
  Any other such tensor (a dense layer after flattening, the airnet's whitening, whose width follows the
  channel count, and the conv reading it) keeps its fresh init and is reported.
- Anything else that does not fit (other widths, another architecture) is an error naming the layers.

The names of the loaded parameters are remembered (`mark_pretrained`), so `pretrained_lr_scale` can give them
their own optimizer param groups; `freeze_stages` freezes the first stages (see `apply_freeze`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarlab.data.official import file_md5
from cifarlab.errors import ConfigError, UserError
from cifarlab.files import require_regular_file
from cifarlab.models import build_model
from cifarlab.train.optim import mark_pretrained
from cifarlab.train.techniques import frozen_stage_modules

__all__ = ["InitResult", "InitSource", "apply_freeze", "apply_init", "check_needs_init", "read_init_source"]

Shape = tuple[int, ...]
_STATE_KEYS = ("model", "state_dict", "model_state_dict")  # where checkpoints of common trainers keep the weights


@dataclass(frozen=True)
class InitSource:
    """Weights read from a run folder or a weights file, with what is known about them."""

    path: Path
    kind: str  # "run folder", "safetensors", "state dict"
    state: dict[str, torch.Tensor]
    md5: str  # of the weights file
    classes: tuple[str, ...] | None = None  # run folders only
    input_shape: tuple[int, int, int] | None = None  # run folders only
    model: str | None = None  # the registered model the run trained (run folders only)
    recipe: str | None = None
    test_accuracy: float | None = None
    trained: Any = None  # the source run's Recipe (run folders only): what its widths etc. were


@dataclass
class InitResult:
    """What `apply_init` did, as stored in config.json under "init" and printed when the run starts."""

    source: str
    kind: str
    md5: str
    loaded: list[str] = field(default_factory=list)  # tensors copied as they are
    adapted: list[str] = field(default_factory=list)  # first conv, summed/repeated over input channels
    new_head: list[str] = field(default_factory=list)  # skipped: the classes differ
    reinitialized: list[str] = field(default_factory=list)  # skipped: their shape follows the input shape
    unused: list[str] = field(default_factory=list)  # in the source, not in the model (bare files only)
    pretrained: list[str] = field(default_factory=list)  # parameter names loaded or adapted
    channels: tuple[int, int] | None = None  # (source, model) input channels, when adapted
    source_classes: list[str] | None = None
    source_input_shape: list[int] | None = None
    source_model: str | None = None
    source_recipe: str | None = None
    source_test_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def summary(self) -> str:
        """One line for the report: where from and what was loaded."""
        layers = _layers(self.loaded + self.adapted)
        parts = [f"{_count(len(layers), 'layer')} loaded"]
        if self.new_head:
            parts.append(f"new head ({', '.join(_layers(self.new_head))})")
        if self.adapted:
            a, b = self.channels or (0, 0)
            parts.append(f"{', '.join(_layers(self.adapted))} adapted from {a} to {b} input channels")
        if self.reinitialized:
            parts.append(f"{', '.join(_layers(self.reinitialized))} re-initialized (shape follows the input)")
        return f"{self.source} ({self.kind}): " + "; ".join(parts)

    def lines(self) -> list[str]:
        """What to print when the run starts: every layer that was not simply loaded is named, with why."""
        src = self.source
        if self.source_recipe:
            src += f" (recipe {self.source_recipe}"
            if self.source_test_accuracy is not None:
                src += f", test accuracy {self.source_test_accuracy:.2%}"
            src += ")"
        out = [f"init: {_count(len(_layers(self.loaded + self.adapted)), 'layer')} loaded from {src}"]
        if self.new_head:
            why = "the classes differ"
            if self.source_classes:
                shown = ", ".join(self.source_classes[:4]) + (", ..." if len(self.source_classes) > 4 else "")
                why = f"the source's {len(self.source_classes)} classes ({shown}) differ"
            out.append(f"init: new head {', '.join(_layers(self.new_head))} ({why})")
        if self.adapted and self.channels:
            a, b = self.channels
            adapted = _layers(self.adapted)
            its = "its" if len(adapted) == 1 else "their"
            how = f"summing {its} kernels over the input channels" if b == 1 else f"repeating {its} kernels / {b}"
            out.append(f"init: {', '.join(adapted)} adapted from {a} to {b} input channels by {how}")
        if self.reinitialized:
            shape = "x".join(map(str, self.source_input_shape or ())) or "another shape"
            fresh = _layers(self.reinitialized)
            keep = "keeps its fresh init: its" if len(fresh) == 1 else "keep their fresh init: their"
            out.append(f"init: {', '.join(fresh)} {keep} shape follows the input shape ({shape} in the source)")
        if self.unused:
            out.append(f"init: not used from the source: {', '.join(_layers(self.unused)[:8])}")
        return out


def _count(n: int, noun: str) -> str:
    """`1 layer`, `13 layers`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _layers(names: Sequence[str]) -> list[str]:
    """Tensor names -> their layers (module names), in order, once each."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(n.rpartition(".")[0] or n, None)
    return list(seen)


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside what a weights file held: a plain one, or one under model/state_dict."""
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path} is not a state dict: {', '.join(bad[:5])} are not named tensors")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from nn.DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(require_regular_file(path, "weights file").read_bytes())
    except UserError:
        raise
    except Exception as e:  # safetensors has its own error types for a damaged header
        raise UserError(f"{path} is not a valid safetensors file ({e})") from None


def _export_kind(path: Path) -> str | None:
    """ "ONNX" or "TorchScript" when `path` is a model export (`cifarlab export` writes both), else None."""
    import zipfile

    with path.open("rb") as f:
        head = f.read(256)
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"pytorch" in head[:64]):  # ModelProto: ir_version
        return "ONNX"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "TorchScript"
    return None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    require_regular_file(path, "weights file")
    export = _export_kind(path)
    if export is not None:
        an = "an" if export == "ONNX" else "a"
        raise UserError(
            f"--init {path} is {an} {export} export: it holds a model for inference, not training weights, so it "
            "cannot be fine-tuned from. Pass the run folder it was exported from (or that run's model.safetensors)"
        )
    with path.open("rb") as f:
        magic = f.read(2)
    import zipfile

    if magic[:1] != b"\x80" and not zipfile.is_zipfile(path):  # torch.save writes a zip, or (legacy) a pickle
        raise UserError(
            f"--init {path} is not a PyTorch weights file (torch.save writes a zip archive); pass a run folder, a "
            ".safetensors file or a file written by torch.save(model.state_dict(), PATH)"
        )
    try:
        # weights_only: tensors and plain containers only, so a tampered file cannot run code. Its warnings would
        # only add torch internals to the one-line refusal.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message suggests weights_only=False, which would run whatever the file holds: never say it.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it asks to import {found.group(1)}" if found else f"{type(e).__name__}"
        raise UserError(
            f"refusing to load {path}: it is not a plain PyTorch state dict ({what}); cifarlab reads weights with "
            "torch.load(weights_only=True) and never unpickles arbitrary objects. Save the weights with "
            "torch.save(model.state_dict(), PATH) or as .safetensors"
        ) from None
    return _tensor_dict(obj, path)


def read_init_source(source: Path | str) -> InitSource:
    """Read the weights SOURCE names (a run folder, a .safetensors file, a PyTorch state-dict file); every way it
    can be wrong is one `UserError` naming it."""
    from cifarlab.runs import WEIGHTS, load_run

    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"--init {source}: no such run folder or weights file")
    if path.is_dir():
        run = load_run(path)
        weights = path / WEIGHTS
        if not weights.is_file():
            raise UserError(f"--init {path}: the run has no {WEIGHTS} (did it finish?)")
        acc = run.metrics.get("test_accuracy")
        src = InitSource(
            path=path,
            kind="run folder",
            state=_read_safetensors(weights),
            md5=file_md5(weights),
            classes=tuple(run.classes),
            input_shape=run.input_shape,
            model=run.recipe.model,
            recipe=run.recipe.name,
            test_accuracy=float(acc) if isinstance(acc, (int, float)) else None,
            trained=run.recipe,
        )
    elif path.name.endswith(".safetensors"):
        src = InitSource(path=path, kind="safetensors", state=_read_safetensors(path), md5=file_md5(path))
    else:
        src = InitSource(path=path, kind="state dict", state=_read_torch(path), md5=file_md5(path))
    bad = [k for k, v in src.state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"--init {path}: weights {', '.join(bad[:3])} are NaN/inf; this model cannot be used")
    return src


def _shapes(model: nn.Module) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _built_shapes(recipe: Any, num_classes: int, input_shape: tuple[int, int, int]) -> dict[str, Shape] | None:
    """The state-dict shapes of `recipe`'s model for these classes and input, built on the meta device (no memory,
    no init cost); None when the model cannot be built there."""
    try:
        with torch.device("meta"):
            return _shapes(build_model(recipe, num_classes, input_shape))
    except Exception:  # a model that cannot be built for that shape (too small an image, say)
        return None


def _first_conv(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return f"{name}.weight"
    return None


def _last_linear(model: nn.Module) -> list[str]:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    if last is None:
        return []
    return [f"{last}.{p}" for p, _ in model.get_submodule(last).named_parameters(recurse=False)]


def _adapt_channels(w: torch.Tensor, c_src: int, c_dst: int) -> torch.Tensor | None:
    """A conv kernel (out, c_src, k, k) for c_dst input channels, or None when there is no sensible rule."""
    if c_dst == 1:
        return w.sum(dim=1, keepdim=True)  # a grey image x gives what the source gave for R = G = B = x
    if c_src == 1:
        return w.repeat(1, c_dst, 1, 1) / c_dst  # C copies of a grey image give what the source gave for it
    return None


def _mismatch_error(source: InitSource, what: str, problems: list[str], hint: str) -> UserError:
    shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
    return UserError(f"--init {source.path}: {what}: {shown}. {hint}")


def _set_value(v: Any) -> str:
    """A recipe value as `--set` takes it: 16,32,64 for widths."""
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, tuple) else f"{v:g}"


def _differing_keys(recipe: Any, trained: Any, num_classes: int, input_shape: tuple[int, int, int]) -> list[str]:
    """The model-size keys whose source value changes the layers' shapes of `recipe`'s model ([] when none does)."""
    from dataclasses import fields

    base = _built_shapes(recipe, num_classes, input_shape)
    out = []
    for f in fields(recipe):
        if not f.metadata.get("size") or getattr(recipe, f.name) == getattr(trained, f.name, None):
            continue
        try:
            other = _built_shapes(recipe.replace(**{f.name: getattr(trained, f.name)}), num_classes, input_shape)
        except Exception:
            continue
        if other is not None and other != base:
            out.append(f.name)
    return out


def _architecture_error(
    source: InitSource, recipe: Any, problems: list[str], num_classes: int, input_shape: tuple[int, int, int]
) -> UserError:
    """The source does not hold the model this recipe builds: say what differs (the model, or the model-size keys
    its run recorded) and the --set that matches it, then the layers."""
    model = getattr(recipe, "model", "?")
    trained = source.trained
    if source.model is not None and source.model != model:
        what = f"the source trained model {source.model!r}, this recipe builds {model!r}"
        hint = f"Add --set model={source.model}"
        if source.recipe:
            hint = f"Use --recipe {source.recipe} (the source's recipe), or add --set model={source.model}"
        hint += " with the source's sizes, or start from a source trained with this model."
        return _mismatch_error(source, what, problems, hint)
    keys = _differing_keys(recipe, trained, num_classes, input_shape) if trained is not None else []
    if keys:
        src_vals = ", ".join(f"{k}={_set_value(getattr(trained, k))}" for k in keys)
        own_vals = ", ".join(f"{k}={_set_value(getattr(recipe, k))}" for k in keys)
        what = f"the source's {model} has {src_vals}, this recipe's has {own_vals}, so its layers do not fit"
        sets = " ".join(f"--set {k}={_set_value(getattr(trained, k))}" for k in keys)
        return _mismatch_error(source, what, problems, f"Add {sets} to match the source.")
    return _mismatch_error(
        source,
        f"it does not hold the model this recipe builds ({model!r}); the first layers that differ",
        problems,
        "Use weights of the same model and sizes (widths and the other model-size keys), or change --set "
        "model/widths to match them.",
    )


def apply_init(
    model: nn.Module,
    source: InitSource,
    *,
    classes: Sequence[str],
    input_shape: tuple[int, int, int],
    recipe: Any = None,
) -> InitResult:
    """Load `source` into `model` by the rules in this module's docstring and return what was done.

    `recipe`: the recipe that built `model` (a registered model), used to tell which tensors follow the number of
    classes and the input shape by building the same architecture on the meta device; None for a user's own
    module, for which the head is its last Linear and only its first conv may differ (in input channels)."""
    tgt = _shapes(model)
    src = {k: tuple(v.shape) for k, v in source.state.items()}
    c_dst = input_shape[0]
    first_conv = _first_conv(model)
    c_src = source.input_shape[0] if source.input_shape else None
    if c_src is None and first_conv in src and len(src[first_conv]) == 4:
        c_src = src[first_conv][1]  # a bare file: its first conv tells its input channels
    src_in = (c_src or c_dst, *(source.input_shape or input_shape)[1:])
    expected: dict[str, Shape] | None = None
    head: set[str] = set()
    if recipe is not None:
        at_n = _built_shapes(recipe, len(classes), input_shape)
        at_n1 = _built_shapes(recipe, len(classes) + 1, input_shape)
        if at_n is not None and at_n1 is not None:
            head = {k for k in at_n if at_n[k] != at_n1.get(k)}
            n_src = len(source.classes) if source.classes else None
            if n_src is None:
                n_src = next((src[k][0] for k in sorted(head) if k in src and src[k]), len(classes))
            expected = _built_shapes(recipe, n_src, src_in)  # what a source of this architecture holds
    if not head:
        head = set(_last_linear(model))
    result = InitResult(
        source=str(source.path),
        kind=source.kind,
        md5=source.md5,
        source_classes=list(source.classes) if source.classes else None,
        source_input_shape=list(src_in) if source.input_shape or c_src else None,
        source_model=source.model,
        source_recipe=source.recipe,
        source_test_accuracy=source.test_accuracy,
    )

    # 1. Does the source hold this architecture at all? (Same tensors, shapes as the model has for its input.)
    ignorable = "num_batches_tracked"  # absent from files written by other tools; the model's own value is fine
    if expected is not None:
        missing = [k for k in expected if k not in src and not k.endswith(ignorable)]
        unexpected = [k for k in src if k not in expected]
        wrong = [f"{k} is {src[k]}, expected {expected[k]}" for k in expected if k in src and src[k] != expected[k]]
        if missing or unexpected or wrong:
            problems = [*wrong, *(f"{k} is missing" for k in missing)]
            problems += [f"{k} is not in the model" for k in unexpected]
            raise _architecture_error(source, recipe, problems, len(classes), src_in)
    else:
        result.unused = [k for k in src if k not in tgt]

    # 2. Tensor by tensor.
    classes_differ = source.classes is not None and tuple(source.classes) != tuple(classes)
    state = model.state_dict()
    problems = []
    for k, shape in tgt.items():
        if k not in src:
            if not k.endswith(ignorable):
                problems.append(f"{k} is missing")
            continue
        if k in head and (classes_differ or src[k] != shape):
            result.new_head.append(k)
            continue
        if src[k] == shape:
            state[k] = source.state[k]
            result.loaded.append(k)
            continue
        s = src[k]
        if k == first_conv and len(s) == 4 and s[0] == shape[0] and s[2:] == shape[2:] and s[1] == c_src:
            w = _adapt_channels(source.state[k], s[1], shape[1])
            if w is not None:
                state[k] = w
                result.adapted.append(k)
                result.channels = (s[1], shape[1])
                continue
        if expected is not None:  # the architecture matched: this shape differs only because the input does
            result.reinitialized.append(k)
        else:
            problems.append(f"{k} is {s}, the model needs {shape}")
    if problems:
        raise _mismatch_error(
            source,
            "its weights do not fit the model",
            problems,
            "Only the head (classes) and the first conv (input channels) may differ for a model of your own.",
        )
    if not result.loaded and not result.adapted:
        raise _mismatch_error(source, "nothing to load", [f"{k}: {s}" for k, s in list(src.items())[:8]], "")
    model.load_state_dict(state)
    params = {n for n, _ in model.named_parameters()}
    result.pretrained = [k for k in (*result.loaded, *result.adapted) if k in params]
    mark_pretrained(model, result.pretrained)
    return result


def apply_freeze(model: nn.Module, n: int, model_name: str = "") -> list[str]:
    """Freeze the parameters of the model's first `n` stages (its `stages()`); the names frozen. The
    `FreezeStages` callback keeps their BatchNorm statistics fixed while training."""
    if n <= 0:
        return []
    frozen: list[str] = []
    ids = {id(p) for m in frozen_stage_modules(model, n, model_name) for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in ids:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def finetune_only_keys(recipe: Any) -> list[str]:
    """The recipe's fine-tuning keys set to something that needs pretrained weights: `freeze_stages=1`, ..."""
    keys = []
    if getattr(recipe, "freeze_stages", 0) > 0:
        keys.append(f"freeze_stages={recipe.freeze_stages}")
    if getattr(recipe, "pretrained_lr_scale", 1.0) != 1.0:
        keys.append(f"pretrained_lr_scale={recipe.pretrained_lr_scale:g}")
    return keys


def recorded_init_source(config_file: Path | str | None) -> str | None:
    """The --init source a run's config.json recorded (its "init" block), or None (not a run's config, no init)."""
    if config_file is None or Path(config_file).suffix.lower() != ".json":
        return None
    import json

    try:
        data = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    init = data.get("init") if isinstance(data, dict) else None
    source = init.get("source") if isinstance(init, dict) else None
    return source if isinstance(source, str) and source else None


def check_needs_init(recipe: Any, config_file: Path | str | None = None) -> None:
    """Refuse fine-tuning-only keys (`freeze_stages` > 0, `pretrained_lr_scale` != 1) when there are no pretrained
    weights (no --init): the frozen stages would stay at their random init, the scale would apply to nothing.
    `config_file`: the --config file, a fine-tuned run's config.json naming the source it started from."""
    keys = finetune_only_keys(recipe)
    if not keys:
        return
    shown = " and ".join(keys)
    reset = "--set freeze_stages=0 --set pretrained_lr_scale=1"
    recorded = recorded_init_source(config_file)
    if recorded is not None:
        import shlex

        raise ConfigError(
            f'--config {config_file} is the config of a run fine-tuned from {recorded} (its "init" block), and '
            f"{shown} only apply to such pretrained weights; config.json does not load them by itself. Add --init "
            f"{shlex.quote(recorded)} to fine-tune the same way, or {reset} to train from scratch"
        )
    raise ConfigError(
        f"{shown}: fine-tuning settings, but there are no pretrained weights (no --init), so the frozen stages "
        "would keep their random init and the LR scale would apply to nothing. Pass --init RUN_DIR (or a weights "
        f"file; init= in Python), or leave them at their defaults ({reset})"
    )


def check_init_args(init: Any, resume: Any) -> None:
    if init is not None and resume is not None:
        raise ConfigError("--resume continues a run with the weights it had; --init cannot be combined with it")
