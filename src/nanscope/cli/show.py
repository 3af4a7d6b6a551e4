"""``nanscope show BUNDLE``: print a saved diagnosis / repro bundle.

Framework-free: reads the bundle's diagnosis.json and checks its state file's size and
SHA-256 (``nanscope.core.bundle``); it imports no framework and unpickles nothing. A missing,
truncated or foreign path is a one-line error with exit status 2; a readable bundle exits 0
(showing is not diagnosing: the failure was reported when the bundle was written).
"""

from __future__ import annotations

import argparse
import json
import sys

from nanscope.core.bundle import describe, read_bundle

HELP = "print a saved diagnosis / repro bundle (what went wrong and what the bundle holds)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="a repro bundle folder (or its diagnosis.json)")
    p.add_argument("--json", action="store_true", help="print the diagnosis JSON (the contract's schema) instead")


def main(args: argparse.Namespace) -> int:
    info = read_bundle(args.bundle)
    if args.json:
        doc = info.diagnosis.to_dict()
        doc["bundle"] = info.manifest
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(str(info.diagnosis))
        print(describe(info))
    sys.stdout.flush()
    return 0
