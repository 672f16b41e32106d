"""Build every test zoo, convert it as the suite does, and record the digests of the outputs.

    PYTHONPATH=. .venv/bin/python tests/record_digests.py [KEY ...] [--out FILE]

writes (or, for the KEYs given, updates) ``tests/data/output_digests.json``: the recording made
from this machine's zoo replaces the one made from the same zoo, and keeps those other machines
made from theirs. Run it when a
change to the bytes coreml-split writes is intended, and say so in the commit. The suite's
fixtures then compare their outputs with these digests (``tests/digests.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import digests  # noqa: E402
import zoos  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("keys", nargs="*", help="only these conversions (default: all)")
    parser.add_argument("--out", type=Path, default=digests.RECORDED)
    args = parser.parse_args(argv)

    from convert.cli import main as cli

    recorded = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table = zoos.conversions()
        session = root / "session-zoo"
        session.mkdir()
        zoos.session(session)
        table["manifest"] = zoos.manifest_conversion(session)
        for key, (recipe, extra) in table.items():
            if args.keys and key not in args.keys:
                continue
            started = time.perf_counter()
            zoo, out = root / key / "zoo", root / key / "out"
            zoo.mkdir(parents=True)
            recipe(zoo)
            code = cli(["convert", str(zoo), "--out", str(out), "--quiet", *extra])
            entry = digests.entry(zoo, out) | {"exit_code": code}
            others = [
                r for r in digests.recordings(recorded, key) if r["inputs"] != entry["inputs"]
            ]
            recorded[key] = [*others, entry]  # this machine's zoo, beside other machines'
            files = len(entry["outputs"])
            print(f"{key}: {files} files, exit {code}, {time.perf_counter() - started:.1f} s")
            args.out.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
