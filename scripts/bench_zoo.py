"""Benchmark converting a zoo with coreml-split against the one-by-one ct.convert loop, in one run.

    python scripts/bench_zoo.py [--sizes 1,4,16] [--work DIR] [--no-write]

Builds zoos of N classifiers (default N = 1, 4 and 16) on one keras.applications MobileNetV2
(alpha 1.0, 224x224x3, ``include_top=False``, ``pooling="avg"``, ``weights=None``, seed 0 via
``keras.utils.set_random_seed``), frozen. Classifier i is that backbone plus its own
``Dense(3 + i % 5, softmax)`` head (weights from a RandomNormal initializer seeded with i + 1),
saved by Keras 3 ``model.save(path)`` as legacy HDF5 with a ``<stem>.labels.txt`` beside it. The
backbone is built once and reused for every classifier; the zoo of N is the first N files of the
largest zoo, hard-linked into its own folder.

For each N, measured side by side in this one run, each command a fresh subprocess:

1. ``python -m convert convert <zoo> --out <empty dir> --quiet`` (cwd = the project): wall time,
   peak RSS of the process tree, bytes of the ``*.mlmodel`` files written;
2. the same command again on the same folder, nothing changed (the no-op rerun): wall time, and
   a check that no ``.mlmodel`` file was rewritten;
3. the first command with ``--backbone-converter coremltools`` added, into another empty
   folder: the backbone traced through TensorFlow and converted with ct.convert instead of
   built from the weights. Wall time, peak RSS, bytes;
4. the naive loop people write today, one process for the whole zoo (``bench_zoo.py --naive
   ZOO OUT``, see :func:`naive_loop`): for each ``.h5``, ``keras.models.load_model`` then
   ``coremltools.convert(model, source="tensorflow", convert_to="neuralnetwork",
   inputs=[ImageType("image", (1, 224, 224, 3), scale=1/127.5, bias=[-1, -1, -1])],
   classifier_config=ClassifierConfig(labels))`` and ``save("<stem>.mlmodel")``. Nothing is
   freed between models (no ``clear_session``), as in a plain loop. Wall time, peak RSS, bytes;
5. the bytes lower bound, ``totals.lower_bound_bytes`` of coreml-split's ``report.json``: the
   zoo's unique parameters x 4 bytes.

Passing the Keras 3 model object straight to ``ct.convert`` works here (coremltools 9.0,
TensorFlow 2.21, Keras 3): coremltools takes it as a ``tf.keras.Model``. Should it raise, the
loop falls back to tracing ``tf.function(lambda x: model(x, training=False))
.get_concrete_function(tf.TensorSpec([1, 224, 224, 3], tf.float32))`` and passing
``[concrete_function]``; the table notes say which way each run went.

Wall time runs from starting the subprocess to its exit, Python and TensorFlow start-up
included: what a user waits for. Peak RSS is the largest sum, over samples taken every 50 ms, of
``VmRSS`` (``/proc/<pid>/status``) of the process and all its descendants (coreml-split's
worker processes, multiprocessing's helpers). Pages shared between processes (TensorFlow's
libraries, loaded by each worker) are counted once per process, so the sum overstates a tree's
physical footprint; both runners are measured the same way.

The table goes to stdout and, unless ``--no-write``, into BENCHMARKS.md as its own section
(the ``### <title>`` mechanism of ``scripts/bench_reference.py``; other sections are left alone).
Temporary folders are removed at the end; a ``--work`` folder is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Zoo conversion: coreml-split vs one-by-one ct.convert"
SIZE = 224
SAMPLE_SECONDS = 0.05
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


# -- helper modes (run as subprocesses) -------------------------------------------------------


def _quiet_imports():
    """TensorFlow, Keras 3 and coremltools, with their start-up chatter silenced."""
    import logging
    import warnings

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.simplefilter("ignore")
    sys.path.insert(0, str(ROOT))
    from convert.heavy import coremltools, keras, tensorflow

    for name in ("absl", "tensorflow", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return tensorflow(), keras(3), coremltools()


def build_zoo(folder: Path, count: int) -> None:
    """``count`` classifiers on one frozen MobileNetV2, as ``clfNN.h5`` + ``clfNN.labels.txt``."""
    _, k, _ = _quiet_imports()
    folder.mkdir(parents=True, exist_ok=True)
    k.utils.set_random_seed(0)
    base = k.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), alpha=1.0, include_top=False, weights=None, pooling="avg"
    )
    base.trainable = False
    for i in range(count):
        classes = 3 + i % 5
        inp = k.Input((SIZE, SIZE, 3), name="image")
        head = k.layers.Dense(
            classes,
            activation="softmax",
            name="head",
            kernel_initializer=k.initializers.RandomNormal(stddev=0.05, seed=i + 1),
        )
        stem = f"clf{i:02d}"
        k.Model(inp, head(base(inp, training=False)), name=stem).save(folder / f"{stem}.h5")
        labels = "".join(f"{stem}_c{j}\n" for j in range(classes))
        (folder / f"{stem}.labels.txt").write_text(labels)


def naive_loop(zoo: Path, out: Path) -> None:
    """The one-by-one loop: load each .h5 with Keras 3, ct.convert it, save it. See the docstring
    of this file for the fallback; ``out/naive.json`` records which way each model went."""
    tf, k, ct = _quiet_imports()
    out.mkdir(parents=True, exist_ok=True)
    ways = {}
    for path in sorted(zoo.glob("*.h5")):
        labels = path.with_name(path.stem + ".labels.txt").read_text().split()
        model = k.models.load_model(path, compile=False)
        options = dict(
            source="tensorflow",
            convert_to="neuralnetwork",
            inputs=[
                ct.ImageType(
                    name="image", shape=(1, SIZE, SIZE, 3), scale=1 / 127.5, bias=[-1, -1, -1]
                )
            ],
            classifier_config=ct.ClassifierConfig(labels),
        )
        try:
            mlmodel = ct.convert(model, **options)
            ways[path.name] = "Keras model"
        except Exception:
            spec = tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32)
            function = tf.function(lambda x, m=model: m(x, training=False))
            mlmodel = ct.convert([function.get_concrete_function(spec)], **options)
            ways[path.name] = "concrete function"
        mlmodel.save(str(out / f"{path.stem}.mlmodel"))
    (out / "naive.json").write_text(json.dumps(ways, indent=1) + "\n")


# -- measuring ---------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc/*/stat."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> int:
    """Sum of VmRSS over ``root`` and all its descendants."""
    tree = _children()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _rss_bytes(pid)
        todo.extend(tree.get(pid, []))
    return total


def run_measured(command: list[str], log: Path) -> dict[str, float]:
    """Run ``command`` (cwd = the project), sampling its process tree's RSS; wall s, peak bytes."""
    env = os.environ | QUIET_ENV
    with open(log, "wb") as sink:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, tree_rss(process.pid))
                stop.wait(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code = process.wait()
        except BaseException:
            os.killpg(process.pid, 9)  # the group this run started, and nothing else
            process.wait()
            raise
        finally:
            stop.set()
            sampler.join()
        wall = time.perf_counter() - started
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(command)} exited with {code}; end of its output:\n{tail}")
    return {"wall": wall, "rss": peak}


def mlmodels(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("*.mlmodel"))}


def mlmodel_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.mlmodel"))


def zoo_of(full: Path, folder: Path, n: int) -> Path:
    """The first ``n`` classifiers of ``full``, linked into ``folder``."""
    folder.mkdir(parents=True)
    for h5 in sorted(full.glob("*.h5"))[:n]:
        for source in (h5, h5.with_name(h5.stem + ".labels.txt")):
            try:
                os.link(source, folder / source.name)
            except OSError:
                shutil.copy2(source, folder / source.name)
    return folder


def bench(n: int, zoo: Path, work: Path) -> dict:
    ours_out, naive_out = work / f"out{n}-coreml-split", work / f"out{n}-naive"
    for folder in (ours_out, naive_out):
        shutil.rmtree(folder, ignore_errors=True)
    tool = [sys.executable, "-m", "convert", "convert", str(zoo), "--out", str(ours_out), "-q"]
    print(f"N={n}: coreml-split convert ...", flush=True)
    ours = run_measured(tool, work / f"log{n}-coreml-split.txt")
    written = mlmodels(ours_out)
    wanted = {f"{h5.stem}.mlmodel" for h5 in zoo.glob("*.h5")}
    if not wanted <= set(written) or len(written) > n + (n > 1):  # one shared backbone if N > 1
        raise SystemExit(f"coreml-split wrote {sorted(written)} for {sorted(wanted)}")
    print(f"N={n}: coreml-split no-op rerun ...", flush=True)
    noop = run_measured(tool, work / f"log{n}-noop.txt")
    rewritten = [name for name, mtime in mlmodels(ours_out).items() if written.get(name) != mtime]
    print(f"N={n}: coreml-split convert --backbone-converter coremltools ...", flush=True)
    ct_out = work / f"out{n}-coreml-split-ct"
    shutil.rmtree(ct_out, ignore_errors=True)
    ct_tool = [*tool[:6], str(ct_out), "-q", "--backbone-converter", "coremltools"]
    ct_run = run_measured(ct_tool, work / f"log{n}-coreml-split-ct.txt")
    if set(mlmodels(ct_out)) != set(written):
        raise SystemExit(f"--backbone-converter coremltools wrote {sorted(mlmodels(ct_out))}")
    print(f"N={n}: naive ct.convert loop ...", flush=True)
    naive_cmd = [sys.executable, str(Path(__file__).resolve()), "--naive", str(zoo), str(naive_out)]
    naive = run_measured(naive_cmd, work / f"log{n}-naive.txt")
    if set(mlmodels(naive_out)) != wanted:
        raise SystemExit(f"the naive loop wrote {sorted(mlmodels(naive_out))}, expected {n}")
    totals = json.loads((ours_out / "report.json").read_text())["totals"]
    row = {
        "n": n,
        "ours_s": ours["wall"],
        "ct_s": ct_run["wall"],
        "ct_rss": ct_run["rss"],
        "ct_bytes": mlmodel_bytes(ct_out),
        "naive_s": naive["wall"],
        "noop_s": noop["wall"],
        "noop_rewritten": rewritten,
        "ours_rss": ours["rss"],
        "naive_rss": naive["rss"],
        "ours_bytes": mlmodel_bytes(ours_out),
        "naive_bytes": mlmodel_bytes(naive_out),
        "lower_bound": totals["lower_bound_bytes"],
        "naive_ways": sorted(set(json.loads((naive_out / "naive.json").read_text()).values())),
    }
    print(
        f"N={n}: ours {row['ours_s']:.1f} s, naive {row['naive_s']:.1f} s, "
        f"no-op {row['noop_s']:.2f} s",
        flush=True,
    )
    return row


# -- reporting ---------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_line() -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    packages = ", ".join(
        f"{p} {_version(p)}" for p in ("coreml-split", "tensorflow", "keras", "coremltools")
    )
    source = f"commit {commit}{' + local changes' if dirty else ''}" if commit else "no git"
    return (
        f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
        f"{packages}; {source}"
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f}"


def table(rows: list[dict], total_s: float) -> str:
    base = rows[0]
    lines = [
        f"### {SECTION} ({time.strftime('%Y-%m-%d')})",
        "",
        f"MobileNetV2 alpha 1.0 {SIZE}x{SIZE} (weights=None, seed 0), frozen, + one Dense(3..7) "
        "head per classifier, Keras 3 HDF5. Every figure measured in one run of "
        f"`scripts/bench_zoo.py --sizes {','.join(str(r['n']) for r in rows)}` "
        f"({total_s / 60:.1f} min); {machine_line()}.",
        "",
        "| N | coreml-split s | naive loop s | speed-up | no-op rerun s | coreml-split peak RSS MB "
        f"| naive peak RSS MB | RSS vs N={base['n']} (coreml-split) | bytes coreml-split "
        "| bytes naive | lower bound | bytes / lower bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['ours_s']:.1f} | {r['naive_s']:.1f} | "
            f"{r['naive_s'] / r['ours_s']:.1f}x | {r['noop_s']:.2f} | {_mb(r['ours_rss'])} | "
            f"{_mb(r['naive_rss'])} | {r['ours_rss'] / base['ours_rss']:.2f} | "
            f"{r['ours_bytes']:,} | {r['naive_bytes']:,} | {r['lower_bound']:,} | "
            f"{r['ours_bytes'] / r['lower_bound']:.4f} |"
        )
    lines += [
        "",
        "The same zoos with `--backbone-converter coremltools` (the backbone traced through "
        "TensorFlow and converted with ct.convert, as before direct backbones), same run:",
        "",
        "| N | coreml-split (ct.convert backbone) s | speed-up vs naive | default vs this "
        "| peak RSS MB | bytes | bytes / lower bound |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['ct_s']:.1f} | {r['naive_s'] / r['ct_s']:.1f}x | "
            f"{r['ct_s'] / r['ours_s']:.1f}x faster | {_mb(r['ct_rss'])} | {r['ct_bytes']:,} | "
            f"{r['ct_bytes'] / r['lower_bound']:.4f} |"
        )
    top = rows[-1]
    speed = top["naive_s"] / top["ours_s"]
    worst_bytes = max(rows, key=lambda r: r["ours_bytes"] / r["lower_bound"])
    worst_ratio = worst_bytes["ours_bytes"] / worst_bytes["lower_bound"]
    slowest = max(rows, key=lambda r: r["noop_s"])
    rss_ratio = top["ours_rss"] / base["ours_rss"]

    def mark(met: bool) -> str:
        return "**met**" if met else "**missed**"

    partial = "" if top["n"] == 16 else f" (N=16 not run: figure at N={top['n']})"
    lines += [
        "",
        "Targets:",
        "",
        f"- Speed-up at N=16 >= 8x: {mark(speed >= 8)}, {speed:.1f}x{partial}.",
        f"- Bytes <= 1.01 x lower bound: {mark(worst_ratio <= 1.01)}, worst {worst_ratio:.4f} "
        f"(N={worst_bytes['n']}).",
        f"- No-op rerun <= 2 s: {mark(slowest['noop_s'] <= 2)}, slowest {slowest['noop_s']:.2f} s "
        f"(N={slowest['n']}).",
        f"- Peak RSS(N=16) <= 1.3 x RSS(N=1): {mark(rss_ratio <= 1.3)}, {rss_ratio:.2f} "
        f"(N={top['n']} vs N={base['n']}).",
        "",
        "Wall times include Python start-up, and TensorFlow's where a command imports it (the "
        "default coreml-split run builds backbone and heads from the weights and does not). "
        "Peak RSS: the largest sum of VmRSS "
        "over each command's process tree, sampled every 50 ms (shared library pages count once "
        "per process). Bytes: the `*.mlmodel` files written; the lower bound is "
        "`totals.lower_bound_bytes` of coreml-split's report.json (unique parameters x 4 bytes). "
        "The naive loop is one process running keras.models.load_model + ct.convert "
        "(neuralnetwork, ImageType, ClassifierConfig) + save per file, passing "
        f"{' / '.join(sorted({w for r in rows for w in r['naive_ways']}))} to ct.convert.",
    ]
    rewritten = {r["n"]: r["noop_rewritten"] for r in rows if r["noop_rewritten"]}
    lines[-1] += (
        f" The no-op rerun rewrote files: {rewritten}."
        if rewritten
        else " The no-op reruns rewrote no `.mlmodel` file."
    )
    return "\n".join(lines) + "\n"


def _write_section(path: Path, marker: str, text: str) -> None:
    """BENCHMARKS.md's section mechanism, shared with scripts/bench_reference.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_reference import _write_section as write

    write(path, marker, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16", help="zoo sizes N (default 1,4,16)")
    parser.add_argument("--work", type=Path, help="keep the zoos and outputs in this folder")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument(
        "--markdown", type=Path, default=ROOT / "BENCHMARKS.md", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--naive", nargs=2, type=Path, metavar=("ZOO", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--build-zoo", nargs=2, metavar=("DIR", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.naive:
        naive_loop(*args.naive)
        return 0
    if args.build_zoo:
        build_zoo(Path(args.build_zoo[0]), int(args.build_zoo[1]))
        return 0
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sizes {args.sizes}: expected comma-separated integers")
    if not sizes or sizes[0] < 1:
        parser.error("--sizes: need at least one N >= 1")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_zoo.") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        full = work / f"zoo-all-{sizes[-1]}"
        shutil.rmtree(full, ignore_errors=True)
        print(f"building {sizes[-1]} classifiers in {work} ...", flush=True)
        t0 = time.perf_counter()
        run_measured(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--build-zoo",
                str(full),
                str(sizes[-1]),
            ],
            work / "log-build-zoo.txt",
        )
        print(f"zoo built in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        for n in sizes:
            zoo = work / f"zoo{n}"
            shutil.rmtree(zoo, ignore_errors=True)
            rows.append(bench(n, zoo_of(full, zoo, n), work))
    text = table(rows, time.perf_counter() - started)
    print()
    print(text)
    if not args.no_write:
        _write_section(args.markdown, SECTION, text)
        print(f"written to {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
