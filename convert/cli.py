"""The command line: ``coreml-split plan`` and ``coreml-split convert``. Only argument handling,
printing and exit codes live here."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from convert import __version__
from convert.build.jobs import BACKBONE_CONVERTERS, DEFAULT_JOBS
from convert.check.verify import TOLERANCES
from convert.errors import RunError, SplitError, internal_reason, traceback_text
from convert.files import locked, prepare_output
from convert.plan.types import DEFAULT_MIN_SHARED
from convert.read.families import PREPROCESSING
from convert.read.training import OPTIMIZERS, TRAINING_KEYS, training_problem

# 0: everything converted (or verified); 1: some file failed, the rest converted (verify: some
# classifier beyond tolerance, or its Core ML files cannot be run); 2: the run itself cannot go
# ahead (arguments, --out, zoo.toml, a damaged report.json); 3 (verify): none beyond tolerance
# and no error, but some classifiers unverified (Keras cannot give a reference); 130:
# interrupted (Ctrl-C).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNVERIFIED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_MAX_DPROB = 0.05


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument said in one line (and exit code 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float, high: float | None = None, what: str = ""):
    """An argparse type: a number of ``kind`` in [low, high]."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if value != value or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    """--updatable and the settings of on-device training (each overrides zoo.toml)."""
    group = parser.add_argument_group("on-device training (each overrides zoo.toml)")
    group.add_argument(
        "--updatable",
        action="store_true",
        help="make every head updatable: an app can fine-tune it with MLUpdateTask",
    )
    group.add_argument("--updatable-layers", type=int, metavar="K", help="the last K Dense (1)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd (default) or adam")
    group.add_argument("--learning-rate", type=float, metavar="R", help="(0.01)")
    group.add_argument("--batch-size", type=int, metavar="N", help="mini-batch size (8)")
    group.add_argument("--epochs", type=int, metavar="N", help="(10)")
    group.add_argument("--momentum", type=float, metavar="M", help="sgd's (0)")
    group.add_argument("--beta1", type=float, metavar="B", help="adam's (0.9)")
    group.add_argument("--beta2", type=float, metavar="B", help="adam's (0.999)")
    group.add_argument("--eps", type=float, metavar="E", help="adam's (1e-8)")
    group.add_argument("--seed", type=int, metavar="N", help="for the shuffle (none)")
    group.add_argument(
        "--no-shuffle", dest="shuffle", action="store_false", default=None, help="keep the order"
    )


def _training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training settings given on the command line; a bad one is a RunError."""
    said = {key: getattr(args, key, None) for key in TRAINING_KEYS}
    said = {key: value for key, value in said.items() if value is not None}
    problem = training_problem(said)
    if problem:
        raise RunError(None, problem)
    return said


def _storage_type(allow_auto: bool):
    """An argparse type: a weight storage name (auto only where ``allow_auto``)."""

    def parse(text: str) -> str:
        from convert.read.manifest import storage_problem

        problem = storage_problem(text, allow_auto=allow_auto)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return text

    return parse


_FRACTION = _number(float, 0.0, 1.0, "a fraction between 0 and 1")
_AT_LEAST_ONE = _number(int, 1, None, "1 or more")
_NOT_NEGATIVE_INT = _number(int, 0, None, "0 or more")
_NOT_NEGATIVE = _number(float, 0.0, None, "0 or more")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="coreml-split",
        description="Split Keras classifiers that share a frozen backbone into one Core ML "
        "backbone plus one linked pipeline per classifier.",
    )
    parser.add_argument("--version", action="version", version=f"coreml-split {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    common = _Parser(add_help=False)
    common.add_argument(
        "models", type=Path, help="a folder of .h5 or .keras files (searched recursively)"
    )
    common.add_argument(
        "--preprocess",
        action="append",
        default=[],
        metavar="[MODEL=]MODE",
        help="input preprocessing, for all models or one (by name or file name). "
        f"MODE is one of: {', '.join(f'{k} ({v.description})' for k, v in PREPROCESSING.items())}."
        " Default: inferred from the backbone family; Teachable Machine uses tf.",
    )
    common.add_argument(
        "--min-shared",
        type=_FRACTION,
        default=DEFAULT_MIN_SHARED,
        metavar="FRACTION",
        help="share a backbone only if it holds at least this fraction of each member's "
        f"parameters (default {DEFAULT_MIN_SHARED})",
    )
    common.add_argument(
        "--weights",
        type=_storage_type(allow_auto=True),
        metavar="STORAGE",
        help="how backbones and standalone models store their weights: float32 (default), "
        "float16, int8 (8 bits, a scale per output channel), paletteN (an N-bit lookup "
        "table per weight, N = 1..8), or auto (per layer, the fewest bytes that keep every "
        "classifier within --max-dprob on --images); overrides zoo.toml",
    )
    common.add_argument(
        "--head-weights",
        type=_storage_type(allow_auto=False),
        metavar="STORAGE",
        help="the same for the heads (default: as --weights, or zoo.toml)",
    )
    _training_arguments(common)
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    common.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    debug = _Parser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", help="show the traceback of an internal error"
    )

    sub.add_parser(
        "plan",
        parents=[common, debug],
        help="show which models share which backbone (no TensorFlow)",
    )
    checking = _Parser(add_help=False)
    checking.add_argument(
        "--images", type=Path, help="folder of test images (default: deterministic synthetic ones)"
    )
    checking.add_argument(
        "--count",
        type=_NOT_NEGATIVE_INT,
        default=16,
        help="number of images per classifier (default 16; 0: every image in --images)",
    )
    for storage, default in TOLERANCES.items():
        checking.add_argument(
            f"--atol-{storage.replace('-', '')}",
            type=_NOT_NEGATIVE,
            default=default,
            metavar="X",
            help=f"max |dprob| allowed with {storage} weights (default {default:g})",
        )
    checking.add_argument(
        "--bundle-main",
        type=Path,
        help="folder that $BUNDLE_MAIN stands for when resolving linked models "
        "(default: each model's own folder)",
    )

    convert = sub.add_parser(
        "convert", parents=[common, checking, debug], help="write the Core ML files"
    )
    convert.add_argument("--out", type=Path, default=Path("build"), help="output folder")
    convert.add_argument(
        "--verify", action="store_true", help="then check every pipeline against Keras"
    )
    convert.add_argument(
        "--max-dprob",
        type=_NOT_NEGATIVE,
        default=DEFAULT_MAX_DPROB,
        metavar="X",
        help="--weights auto: the largest change of any probability allowed against float32, "
        f"on every image (default {DEFAULT_MAX_DPROB:g}); top-1 must not change",
    )
    convert.add_argument(
        "--jobs",
        type=_AT_LEAST_ONE,
        default=DEFAULT_JOBS,
        metavar="N",
        help=f"convert up to N groups at once, in separate processes (default {DEFAULT_JOBS})",
    )
    convert.add_argument(
        "--backbone-converter",
        choices=BACKBONE_CONVERTERS,
        default="auto",
        help="auto (default): build each backbone and standalone model straight from the .h5 "
        "weights when all its layers are covered, else convert it with ct.convert; "
        "coremltools: always ct.convert",
    )
    verify = sub.add_parser(
        "verify",
        parents=[checking, debug],
        help="run each pipeline (numpy reference evaluator) and its Keras model on the same "
        "images and compare",
    )
    verify.add_argument("build", type=Path, help="a folder written by `coreml-split convert`")
    verify.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="verify only these classifiers"
    )
    verify.add_argument(
        "--compute",
        choices=("float32", "float16"),
        default="float32",
        help="float32 (default): evaluate as Core ML's CPU does; float16: round activations and "
        "weights to float16 as the GPU and the Neural Engine do, to see how far results move "
        "on a device (tolerance: the float16 one, or the weights' when weaker)",
    )
    verify.add_argument("--json", action="store_true", help="print JSON instead of lines")
    verify.add_argument("-q", "--quiet", action="store_true", help="print only failures")
    update = sub.add_parser(
        "update",
        parents=[debug],
        help="train an updatable pipeline on labelled photos, as MLUpdateTask does on a device, "
        "and write the updated model",
    )
    update.add_argument("pipeline", type=Path, help="a pipeline converted with --updatable")
    update.add_argument(
        "--images",
        type=Path,
        required=True,
        metavar="DIR",
        help="one sub-folder of images per label, named as the label (as Create ML takes them)",
    )
    update.add_argument("--out", type=Path, required=True, help="the updated .mlmodel")
    update.add_argument("--epochs", type=int, metavar="N", help="instead of the model's own")
    update.add_argument(
        "--bundle-main", type=Path, metavar="DIR", help="where $BUNDLE_MAIN is, for the backbone"
    )
    update.add_argument(
        "--verify",
        action="store_true",
        help="then check the updated model against its Keras model given the learned weights",
    )
    update.add_argument("--json", action="store_true", help="print JSON instead of lines")
    update.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return parser


def _preprocessing(values: list[str]) -> tuple[dict[str, str], str | None]:
    per_model: dict[str, str] = {}
    default = None
    for value in values:
        name, _, mode = value.rpartition("=")
        if mode not in PREPROCESSING:
            raise SplitError(None, f"--preprocess {value}: unknown mode '{mode}'")
        if name:
            per_model[name] = mode
        else:
            default = mode
    return per_model, default


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    width = None if sys.stdout.isatty() else 140  # pipes and CI logs get whole tables
    out = Console(width=width)
    err = Console(stderr=True, soft_wrap=True)
    try:
        return _run(args, out, err)
    except SplitError as exc:  # the run itself cannot go ahead
        _say(err, f"error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say(err, "interrupted: the files written so far are whole; run again to finish")
        return EXIT_INTERRUPTED
    except Exception as exc:  # not foreseen: one line, the traceback with --debug
        _say(err, f"error: {internal_reason(exc)}")
        if args.debug:
            _say(err, traceback_text(exc))
        return EXIT_FAILED


def _say(console, text: str) -> None:
    """One message, whole: never cropped to the console's width (a pipe's is 140)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _warn(console, text: str) -> None:
    """A damaged cache entry that was dropped: said even with --quiet, never an error."""
    _say(console, f"warning: {text}")


def _update_command(args, out) -> int:
    from dataclasses import asdict

    from convert.check.update import update_pipeline

    show = not (args.quiet or args.json)
    result = update_pipeline(
        args.pipeline,
        args.images,
        args.out,
        args.epochs,
        args.bundle_main,
        (lambda msg: _say(out, msg)) if show else None,
    )
    if show:
        _say(
            out,
            f"accuracy on those images: {result.accuracy_before:.0%} before, "
            f"{result.accuracy_after:.0%} after; wrote {args.out} ({result.bytes:,} bytes) "
            f"in {result.seconds:.1f} s",
        )
    code, found = 0, {}
    if args.verify:
        code, found = _verify_update(args, (lambda msg: _say(out, msg)) if show else None)
    if args.json:
        print(json.dumps({**asdict(result), **found}, indent=2))
    return code


def _verify_update(args, say) -> tuple[int, dict]:
    """Verify the updated model in the place of its classifier in the build it came from,
    the backbone found from that build as from an app's bundle."""
    from convert.check.update import classifier_name
    from convert.check.verify import PASSED, as_json, verify_build

    build = args.pipeline.parent
    name = classifier_name(build, args.pipeline)
    run = verify_build(
        build,
        only=[name],
        files={name: args.out},
        bundle_main=args.bundle_main or build,
        progress=say,
    )
    problems = [p.line for p in run.errors + run.unverified]
    found = {"verify": as_json(run.results), "verify_problems": problems}
    return (0 if run.outcome == PASSED else 1), found


def _run(args, out, err) -> int:
    if args.command == "update":
        return _update_command(args, out)
    notice = (lambda _msg: None) if args.quiet else (lambda msg: _say(err, msg))
    verifying = args.command == "verify" or getattr(args, "verify", False)
    if verifying and args.count == 0 and args.images is None:
        raise RunError(None, "--count 0 means every image in --images, and no --images was given")
    if args.command == "verify":
        if not args.build.is_dir():
            raise RunError(args.build, "no such folder; run `coreml-split convert` first")
        with locked(args.build, notice):
            return _verify_command(args.build, args, out, err)
    per_model, default = _preprocessing(args.preprocess)
    from convert.plan.make import make_plan
    from convert.read.manifest import load_manifest
    from convert.read.sources import SourceCache

    writing = args.command == "convert"
    if writing:
        prepare_output(args.out)
    with locked(args.out, notice) if writing else contextlib.nullcontext():
        started = time.perf_counter()
        manifest = load_manifest(args.models)
        sources = SourceCache(args.out if writing else None)
        with _progress(err, not (args.quiet or args.json), "reading the zoo") as shown:
            plan, graphs = make_plan(
                args.models,
                per_model,
                default,
                args.min_shared,
                manifest,
                sources,
                weights=args.weights,
                head_weights=args.head_weights,
                updatable=args.updatable,
                training=_training_overrides(args),
                step=shown.step,
            )
        for line in sources.warnings:
            _warn(err, line)
        if args.command == "plan":
            return _plan_command(plan, args, out, err, time.perf_counter() - started)
        return _convert_command(plan, graphs, manifest, sources, args, out, err)


def _print_errors(errors, err, debug: bool = False) -> None:
    for e in errors:
        _say(err, f"error: {e.line}")
        if debug and e.trace:
            _say(err, e.trace)


def _plan_command(plan, args, out, err, seconds: float) -> int:
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    elif not args.quiet:
        from convert.report import groups_table, plan_table

        out.print(plan_table(plan))
        if plan.groups:
            out.print(groups_table(plan))
        out.print(
            f"{len(plan.models)} models, {len(plan.groups)} shared backbone(s), "
            f"{sum(1 for m in plan.models if m.group is None)} standalone; "
            f"planned in {seconds:.1f}s"
        )
    _print_errors(plan.errors, err, args.debug)
    if not plan.models and not plan.errors:
        err.print(f"error: {args.models}: no .h5 or .keras models found", markup=False)
        return EXIT_FAILED
    return EXIT_FAILED if plan.errors else EXIT_OK


def _convert_command(plan, graphs, manifest, sources, args, out, err) -> int:
    from convert.build.run import build
    from convert.report import groups_table, plan_table, size_table, summary_line

    if not plan.models:
        _print_errors(plan.errors, err, args.debug)
        if not plan.errors:
            err.print(f"error: {args.models}: no .h5 or .keras models found", markup=False)
        return EXIT_FAILED
    show = not (args.quiet or args.json)
    if show:
        out.print(plan_table(plan))
        if plan.groups:
            out.print(groups_table(plan))
    started = time.perf_counter()
    calibration = _calibration(plan, args)
    with _progress(err, show, "building") as shown:
        report = build(
            plan,
            graphs,
            args.out,
            shown.say,  # says nothing with --quiet or --json
            manifest,
            args.jobs,
            sources,
            backbone_converter=args.backbone_converter,
            warn=lambda line: _warn(err, line),
            calibration=calibration,
            step=shown.step,
        )
    kit = _write_reports(report, args.out, err)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    elif show:
        out.print(size_table(report))
        _say(out, summary_line(report))
        seconds = time.perf_counter() - started
        _say(out, f"done in {seconds:.1f}s; report: {args.out / 'report.html'}")
        for path in (p for p in kit if p.name == "README.md"):  # unless the folder had its own
            _say(out, f"Xcode: {path} says what to drag where")
    _print_errors(report.errors, err, args.debug)
    if report.errors:
        if args.verify:
            _verify_command(args.out, args, out, err)
        return EXIT_FAILED
    return _verify_command(args.out, args, out, err) if args.verify else EXIT_OK


def _write_reports(report, out: Path, err) -> list[Path]:
    """report.json/.md/.svg, the page (report.html) and the Xcode kit (README.md and the Swift
    loaders), all from the one report; returns the kit's files."""
    from convert.report import write_reports
    from convert.report_html import write_page
    from convert.xcode import write_kit

    write_reports(report, out)
    write_page(report, out)
    return write_kit(report, out, warn=lambda line: _warn(err, line))


def _calibration(plan, args):
    """What quantized storages calibrate on: --images (with --count), or synthetic images;
    --weights auto needs real ones."""
    from convert.build.jobs import Calibration
    from convert.check.verify import image_files
    from convert.files import file_sha256
    from convert.read.manifest import AUTO, calibrated

    if args.images is None:
        if any(g.weights == AUTO for g in plan.groups):
            raise RunError(None, "--weights auto measures on images: give them with --images DIR")
        return Calibration(None, 0, args.max_dprob)
    storages = [g.weights for g in plan.groups] + [m.weights for m in plan.models]
    if not any(calibrated(s) for s in storages):  # --images for verify only: nothing to hash
        return Calibration(None, 0, args.max_dprob)
    if not args.images.is_dir():
        raise RunError(args.images, "no such folder of images (--images)")
    files = image_files(args.images, args.count or None)
    listing = "".join(f"{p.relative_to(args.images)}:{file_sha256(p)};" for p in files)
    digest = hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()
    return Calibration(args.images, args.count, args.max_dprob, digest)


@contextlib.contextmanager
def _progress(err, show: bool, what: str, out=None):
    """What a long stage shows: its lines (``.say``), and on a terminal a live bar with counts
    (``.step(done, total)``: files read, jobs built, classifiers verified) and the time taken.
    Neither shows with --quiet or --json; off a terminal only the lines do. A stage whose lines
    are output (verify's results, on ``out``) shows the bar only when that is a terminal too,
    so that ``verify build > results.txt`` gets every result."""
    if not (show and err.is_terminal and (out is None or out.is_terminal)):
        yield _Shown(err if show else None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        yield _Shown(bar.console, bar, bar.add_task(what, total=None))


class _Shown:
    """The lines and the bar of one stage (see :func:`_progress`)."""

    def __init__(self, console, bar=None, task=None) -> None:
        self.console, self.bar, self.task = console, bar, task

    def say(self, msg: str) -> None:
        if self.console is not None:
            _say(self.console, msg)

    def step(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total, refresh=True)


def _verify_command(build_dir: Path, args, out, err) -> int:
    from convert.check.verify import BEYOND, ERROR, UNVERIFIED, as_json, verify_build
    from convert.report import Report

    tolerances = {s: getattr(args, f"atol_{s.replace('-', '')}") for s in TOLERANCES}
    show = not (args.quiet or args.json)
    with _progress(err, show, "verifying", out) as shown:
        # each result is a line of the output; on a terminal it is printed above the bar
        lines = shown.say if shown.bar is not None else (lambda msg: _say(out, msg))
        run = verify_build(
            build_dir,
            args.images,
            args.count,
            tolerances,
            args.bundle_main,
            lines if show else None,
            only=getattr(args, "only", None) or None,
            compute=getattr(args, "compute", "float32"),  # convert --verify: float32
            step=shown.step,
        )
    report_path = build_dir / "report.json"
    try:
        report = Report.from_json(json.loads(report_path.read_text()))
    except (KeyError, TypeError, ValueError) as exc:
        said = f"{type(exc).__name__}: {exc}"
        raise RunError(
            report_path, f"is damaged ({said}); run `coreml-split convert` again"
        ) from None
    merged = {v["name"]: v for v in report.verify or []}  # keep earlier --only runs
    for problem in run.errors + run.unverified:  # not compared this time: no stale result
        merged.pop(problem.name, None)
    merged.update({v["name"]: v for v in as_json(run.results)})
    report.verify = [merged[c.name] for c in report.classifiers if c.name in merged]
    _write_reports(report, build_dir, err)
    if args.json:
        unverified = [
            {"name": p.name, "file": p.file, "path": p.path, "reason": p.reason}
            for p in run.unverified
        ]
        errors = [(p.path, p.reason) for p in run.errors]
        print(
            json.dumps(
                {"verify": report.verify, "unverified": unverified, "errors": errors}, indent=2
            )
        )
    if args.quiet:
        for r in run.beyond:
            _say(err, r.line)
    for problem in run.errors + run.unverified:
        said = "error" if problem.status == ERROR else "unverified"
        _say(err, f"{said}: {problem.path}: {problem.reason}")
        if args.debug and problem.trace:
            _say(err, problem.trace)
    if show:
        _say(out, run.summary)
    return {BEYOND: EXIT_FAILED, UNVERIFIED: EXIT_UNVERIFIED}.get(run.outcome, EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())
