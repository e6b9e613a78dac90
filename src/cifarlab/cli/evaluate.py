"""`cifarlab evaluate`: evaluate a saved run again and print (and save) every number."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import unicodedata
from pathlib import Path
from typing import Any

from cifarlab.cli.common import data_dir_arg, fmt, output_may_close, print_error, printable, warn
from cifarlab.errors import UserError

# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "evaluate a saved run: accuracy, top-5, loss, per-class metrics, confusions, calibration"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help=HELP,
        **fmt(
            "Load a run's weights and config, predict its test split (or its reproduced validation split) in eval\n"
            "mode, and print accuracy, top-5 accuracy, loss, expected calibration error, the per-class table\n"
            "(precision, recall, F1, support) and each class's most frequent confusions. Writes\n"
            "RUN_DIR/eval_<split>.json with every number (confusion matrices, calibration bins, ...).\n"
            "--test-data evaluates on another labelled test set with the run's classes (matched by name);\n"
            "--corruptions measures accuracy under CIFAR-10-C style corruptions at severities 1..5.",
            "cifarlab evaluate runs/20261125-120000-reference --split val --data-dir ../shared/data\n"
            "  cifarlab evaluate runs/20261125-120000-reference --corruptions --corruption-limit 1000",
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder written by cifarlab train")
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="test (default) or val: the run's validation split, reproduced from its config",
    )
    data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print the evaluation as JSON instead of the summary")
    p.add_argument(
        "--test-data",
        type=Path,
        default=None,
        metavar="PATH",
        help="evaluate on another labelled test set with (a subset of) the run's classes, matched by name: the "
        "path of an ImageFolder tree or .tar.gz (its test/ split) or a CIFAR archive/folder (a relative path not "
        "found here is looked for in --data-dir, default $CIFARLAB_DATA or ~/.cache/cifarlab), decoded at the "
        "run's input size; saved as RUN_DIR/eval_data-<name>-<hash of its path>.json (with --corruptions: "
        "eval_corruptions-data-<...>.json)",
    )
    g = p.add_argument_group("robustness (CIFAR-10-C style corruptions)")
    g.add_argument(
        "--corruptions",
        action="store_true",
        help="accuracy under common corruptions (noise, blur, brightness, contrast, fog, pixelate, JPEG) per "
        "severity, their mean and the relative drop from clean accuracy; saved as RUN_DIR/eval_corruptions.json",
    )
    g.add_argument("--severities", default="1,2,3,4,5", help="comma-separated severities 0..5 (default: 1,2,3,4,5)")
    g.add_argument(
        "--corruption-names",
        default=None,
        metavar="NAMES",
        help="comma-separated corruptions (default: all registered)",
    )
    g.add_argument(
        "--corruption-limit",
        type=int,
        default=None,
        metavar="N",
        help="use N test images only, a random subset fixed by --corruption-seed (a quicker estimate)",
    )
    g.add_argument("--corruption-seed", type=int, default=0, help="seed of the random corruptions (default: 0)")
    p.set_defaults(func=cmd_evaluate)


def _write(out: Path, data: Any) -> str | None:
    """Write `data` to `out`; None when written, else why not (a folder that cannot be written costs the file,
    not the numbers, which are printed after it anyway)."""
    from cifarlab.files import write_json
    from cifarlab.runs import weights_sha256

    if isinstance(data, dict):  # the weights it was computed from: a resumed or recalibrated run's tell it stale
        data = {**data, "weights_sha256": weights_sha256(out.parent)}
    try:
        write_json(out, data)
    except OSError as exc:
        return f"results not saved: cannot write {out}: {exc.strerror or exc}"
    return None


def _said_saved(out: Path, error: str | None, quiet: bool) -> int:
    """The last line: where the results went, or why they were not saved (exit status 1)."""
    if error is not None:
        print_error(error)
        return 1
    if not quiet:
        print(f"\nwritten: {out}")
    return 0


def _save(out: Path, data: Any, quiet: bool) -> int:
    """Write `data` to `out` and say so (or why not): `_write`, then `_said_saved`."""
    return _said_saved(out, _write(out, data), quiet)


_NAME_BYTES = 64  # the base name's part of a results file name: well under the 255 bytes a file name may take


def _safe_name(name: str) -> str:
    """`name` as a file-name part: letters and digits of any script kept (a folder named `données` or `猫` must
    not come out empty), runs of anything else (separators, spaces, control characters) one "_", at most
    `_NAME_BYTES` bytes of UTF-8."""
    # NFC: macOS stores "é" as "e" plus a combining accent, which is no letter of its own
    name = unicodedata.normalize("NFC", name)
    out: list[str] = []
    replaced = False  # the last character was replaced: a run of them becomes one "_"
    for ch in name:
        if ch.isalnum() or ch in "._-":
            out.append(ch)
            replaced = False
        elif not replaced:
            out.append("_")
            replaced = True
    name = "".join(out).strip("._")
    while len(name.encode("utf-8")) > _NAME_BYTES:  # by bytes: a CJK character takes 3
        name = name[:-1]
    return name.rstrip("._") or "data"


def _slug(path: Path) -> str:
    """`<name>-<hash>` of a --test-data source: its base name, to read, and 8 hex digits of its resolved path, so
    `folder` and `folder.tar.gz`, or `a/test` and `b/test`, never share (and overwrite) one results file."""
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    name = _safe_name(name)
    digest = hashlib.sha256(str(path.expanduser().resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{name}-{digest}"


def cmd_corruptions(args: argparse.Namespace, dataset: Any, test_data: Path | None) -> int:
    """`test_data`: the --test-data source (resolved), whose results go to a file of their own: the report reads
    eval_corruptions.json as the run's robustness, on its own test set."""
    from cifarlab.corruptions import evaluate_corruptions, format_corruptions, parse_severities

    names = [n.strip() for n in args.corruption_names.split(",") if n.strip()] if args.corruption_names else None
    result = evaluate_corruptions(
        args.run_dir,
        dataset=dataset,
        data_dir=args.data_dir,
        severities=parse_severities(args.severities),
        names=names,
        limit=args.corruption_limit,
        seed=args.corruption_seed,
        progress=None if args.json else lambda line: print(printable(line), file=sys.stderr, flush=True),
    )
    name = "eval_corruptions.json" if test_data is None else f"eval_corruptions-data-{_slug(test_data)}.json"
    out = Path(args.run_dir) / name
    error = _write(out, result)  # before printing: output whose reader has gone must not cost the file
    if args.json:
        print(json.dumps(result, indent=2), flush=True)
    else:
        print(format_corruptions(result), flush=True)
    return _said_saved(out, error, args.json)


def _warn_unfinished(run_dir: Path) -> None:
    """A stopped or crashed run evaluates its last saved weights: said, so its numbers are not read as final."""
    from cifarlab.runs import CHECKPOINT, load_run, resume_command, run_status, start_again
    from cifarlab.text import plural

    try:
        run = load_run(run_dir)
        status, _ = run_status(run)
    except (UserError, OSError):
        return  # evaluate_run says what is wrong with the folder
    if status in ("finished", "unknown"):
        return
    done = len(run.history)
    how = "is still training" if status == "running" else f"has not finished ({status} after {plural(done, 'epoch')})"
    if status == "running":
        hint = ""
    elif (run.path / CHECKPOINT).is_file():
        hint = f"; {resume_command(run.path, run.config.get('distributed'))} continues it"
    else:  # stopped before its first epoch ended: --resume refuses it
        hint = f"; it has nothing to resume: {start_again(run.path)}"
    warn(f"{run.path.name} {how}: these are the numbers of its last saved weights{hint}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate, warn first when the data is not the run's, save eval_<split>.json, then print.

    The file is written before anything is printed after the evaluation, and output whose reader has gone is
    dropped: `| head` costs the output, not the file. A folder that cannot be written (read-only, full disk)
    costs the file, not the numbers; the reason is then one line and the exit status 1."""
    with output_may_close():  # `... 2>&1 | head`: a reader that goes away costs the output, not the results
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from cifarlab.evaluate import dataset_warning, evaluate_run, format_summary
    from cifarlab.inference import set_threads

    given = [
        flag
        for flag, value, default in (
            ("--severities", args.severities, "1,2,3,4,5"),
            ("--corruption-names", args.corruption_names, None),
            ("--corruption-limit", args.corruption_limit, None),
            ("--corruption-seed", args.corruption_seed, 0),
        )
        if value != default
    ]
    if given and not args.corruptions:  # silently evaluating without them would look like they were used
        raise UserError(f"{', '.join(given)} only apply with --corruptions")
    set_threads()
    _warn_unfinished(args.run_dir)
    dataset = None
    test_data = None
    if args.test_data is not None:
        from cifarlab.evaluate import load_test_data, resolve_test_data
        from cifarlab.runs import load_run

        if args.split != "test":
            raise UserError("--test-data is a test set: it has no validation split (drop --split val)")
        test_data = resolve_test_data(args.test_data, args.data_dir)
        dataset = load_test_data(load_run(args.run_dir), test_data)
    if args.corruptions:
        return cmd_corruptions(args, dataset, test_data)
    ev, _ = evaluate_run(args.run_dir, split=args.split, data_dir=args.data_dir, dataset=dataset)
    data = ev.to_dict()
    name = f"data-{_slug(test_data)}" if test_data is not None else args.split
    out = Path(args.run_dir) / f"eval_{name}.json"
    error = _write(out, data)  # before printing: output whose reader has gone must not cost the file
    warning = dataset_warning(ev)
    if warning:
        warn(warning)
    if args.json:
        print(json.dumps(data, indent=2), flush=True)
    else:
        print(format_summary(ev), flush=True)
    return _said_saved(out, error, args.json)
