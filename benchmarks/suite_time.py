"""The test suite's size, outcome and wall time, as a results file for the docs.

    python benchmarks/suite_time.py --json suite.json [-- extra pytest arguments]

Runs ``python -m pytest`` (the README's test command: lint, tests, two workers) in this checkout, passes its output
through, and writes what pytest's last line says (``N passed, M skipped …``) with the wall time. Then
``python -m experiments.docs_tables collect suite.json test-suite --benchmark --command "…"`` makes it the
docs' results file (docs/benchmarks.md states the suite's time from it).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def outcome(line: str) -> dict[str, int]:
    """pytest's summary line (``== 289 passed, 2 skipped, 3 warnings in 855.12s ==``) as counts per outcome."""
    return {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in OUTCOME.findall(line)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the report to this file")
    p.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args.pytest_args], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    last = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        if OUTCOME.search(line) and " in " in line:
            last = line
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    counts = outcome(last)
    if not counts:
        raise SystemExit(f"pytest ended (exit status {rc}) without its summary line")
    report = {"outcome": counts, "seconds": round(seconds, 1), "exit_status": rc,
              "command": " ".join(["python -m pytest", *args.pytest_args])}
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
