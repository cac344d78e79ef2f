"""Republishing an engine dir under a reader: one atomic swap vs two renames, side by side.

    python bench/bench_republish.py [--swaps 300]

A child process polls `<dir>/manifest.json` as fast as it can while this process replaces the
dir --swaps times with `fsio.replace_dir`: once as shipped (renameat2 RENAME_EXCHANGE on Linux),
once with the exchange disabled (the two-rename fallback other systems get). Prints how many of
the reader's polls found the dir missing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READER = """
import os, sys
final, stop = sys.argv[1], sys.argv[2]
seen = misses = 0
while not os.path.exists(stop):
    seen += 1
    misses += not os.path.isfile(os.path.join(final, "manifest.json"))
print(seen, misses)
"""


def run(swaps: int, exchange: bool) -> tuple[int, int]:
    from trt_pipeline import fsio

    saved = fsio._exchange
    if not exchange:
        fsio._exchange = lambda a, b: False
    try:
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            final, stop = root / "engine", root / "stop"
            final.mkdir()
            (final / "manifest.json").write_text("0")
            reader = subprocess.Popen([sys.executable, "-c", READER, str(final), str(stop)],
                                      stdout=subprocess.PIPE, text=True)
            time.sleep(0.3)
            for i in range(swaps):
                tmp = root / f".engine.tmp-{i}"
                tmp.mkdir()
                (tmp / "manifest.json").write_text(str(i))
                fsio.replace_dir(tmp, final)
            stop.touch()
            seen, misses = map(int, reader.communicate(timeout=60)[0].split())
            return seen, misses
    finally:
        fsio._exchange = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=300)
    args = ap.parse_args()
    for name, exchange in (("RENAME_EXCHANGE (shipped)", True), ("two renames", False)):
        seen, misses = run(args.swaps, exchange)
        print(f"{name}: {misses} of {seen} polls found the dir missing over {args.swaps} swaps")


if __name__ == "__main__":
    main()
