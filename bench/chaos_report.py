"""Run the chaos suite and print each scenario's outcome and measured times as a table.

Run by hand from the repository root:

    python bench/chaos_report.py [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/test]
                                 [-k EXPRESSION] [--json report.json]

Runs ``pytest tests/chaos`` (both backends when a PostgreSQL URL is given, else
SQLite only), collects what the scenarios record through their ``measure``
fixture (``TRAPLINE_CHAOS_TIMES``) and each test's outcome and duration (a JUnit
XML report), and prints one row per scenario and backend, then the total time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def outcomes(junit: Path) -> dict[str, tuple[str, float]]:
    """Test name (with its parameters) -> (outcome, seconds)."""
    found: dict[str, tuple[str, float]] = {}
    if not junit.exists():
        return found
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "FAIL"
        elif case.find("skipped") is not None:
            outcome = "skip"
        else:
            outcome = "pass"
        found[case.get("name", "?")] = (outcome, float(case.get("time", 0.0)))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("TRAPLINE_TEST_DATABASE_URL"))
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="trapline-chaos-") as tmp:
        times = Path(tmp) / "times.jsonl"
        junit = Path(tmp) / "junit.xml"
        env = dict(os.environ, TRAPLINE_CHAOS_TIMES=str(times))
        env.pop("TRAPLINE_TEST_DATABASE_URL", None)
        if args.database_url:
            env["TRAPLINE_TEST_DATABASE_URL"] = args.database_url
        cmd = [sys.executable, "-m", "pytest", "tests/chaos", "-q", f"--junitxml={junit}"]
        if args.keyword:
            cmd += ["-k", args.keyword]
        started = time.monotonic()
        code = subprocess.call(cmd, cwd=ROOT, env=env)
        total = time.monotonic() - started
        measured: dict[str, dict[str, Any]] = {}
        if times.exists():
            for line in times.read_text().splitlines():
                record = json.loads(line)
                measured[record.pop("test")] = record
        results = outcomes(junit)

    rows = []
    for name, (outcome, seconds) in sorted(results.items()):
        record = measured.get(name, {})
        rows.append({"test": name, "outcome": outcome, "seconds": round(seconds, 1), **record})
    print()
    print(f"{'outcome':7} {'s':>6}  scenario [backend]: measurements")
    for row in rows:
        values = ", ".join(
            f"{k}={v}" for k, v in row.items() if k not in ("test", "outcome", "seconds", "backend")
        )
        print(
            f"{row['outcome']:7} {row['seconds']:6.1f}  {row['test']}"
            + (f": {values}" if values else "")
        )
    print(f"\ntotal {total:.0f} s, pytest exit code {code}")
    if args.json:
        args.json.write_text(json.dumps({"total_s": round(total, 1), "rows": rows}, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
