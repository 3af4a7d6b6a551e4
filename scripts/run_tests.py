"""Run the whole test suite, one pytest process per framework.

Why separate processes: importing torchvision after tensorflow in one process crashes
(torch 2.14.1 + tensorflow 2.21), and nanscope must be tested the way users run it, with only
the framework their program imports. A suite that runs no test counts as a failure.

Usage: python scripts/run_tests.py [SUITE ...] [-- PYTEST ARGS]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = {
    "core": [
        "tests/core",
        "tests/cli",
        "src/nanscope/core",
        "src/nanscope/data",
        "src/nanscope/audit",
        "src/nanscope/cli",
        "src/nanscope/losses.py",
        "--doctest-modules",
    ],
    "torch": ["tests/torch"],
    "keras": ["tests/keras"],
    "integrations": ["tests/integrations"],
    "distributed": [
        "tests/distributed"
    ],  # real process groups: every test launches its own workers
}


def _counts(junit: Path) -> tuple[int, int, int]:
    """(passed, failed, skipped) from a junit xml report."""
    if not junit.exists():
        return 0, 0, 0
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tests = failed = skipped = 0
    for s in suites:
        tests += int(s.get("tests", 0))
        failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
    return tests - failed - skipped, failed, skipped


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    names = argv or list(SUITES)
    total_p = total_f = total_s = 0
    bad: list[str] = []
    env = dict(os.environ, PYTHONHASHSEED="0", TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            paths = [p for p in SUITES[name] if p.startswith("-") or (ROOT / p).exists()]
            if not any(not p.startswith("-") for p in paths):
                bad.append(f"{name} (no test folder)")
                continue
            junit = Path(tmp) / f"{name}.xml"
            cmd = [
                sys.executable,
                "-m",
                "pytest",
                *paths,
                f"--junitxml={junit}",
                "-p",
                "no:cacheprovider",
                *extra,
            ]
            print(f"\n=== suite {name}: {' '.join(cmd[1:])}", flush=True)
            rc = subprocess.call(cmd, cwd=ROOT, env=env)
            p, f, s = _counts(junit)
            total_p, total_f, total_s = total_p + p, total_f + f, total_s + s
            if rc != 0 or p == 0:
                bad.append(f"{name} (exit {rc}, {p} passed)")
    print()
    if bad:
        print("failed suites: " + ", ".join(bad))
    print(f"{total_p} passed, {total_f} failed, {total_s} skipped")
    return 1 if bad or total_f or total_p == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
