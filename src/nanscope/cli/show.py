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
from nanscope.core.io import check_writable, refuse_same_file
from nanscope.report.console import echo

HELP = "print a saved diagnosis / repro bundle (what went wrong and what the bundle holds)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="a repro bundle folder (or its diagnosis.json)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the diagnosis JSON (the contract's schema) instead",
    )
    p.add_argument(
        "--html", metavar="FILE", help="also write the bundle as a self-contained HTML report"
    )


def main(args: argparse.Namespace) -> int:
    if args.html:
        check_writable(args.html, what="HTML report")
        refuse_same_file(args.bundle, args.html)
    info = read_bundle(args.bundle)
    if args.json:
        doc = info.diagnosis.to_dict()
        doc["bundle"] = info.manifest
        print(json.dumps(doc, indent=2, default=str))
    else:
        echo(info.diagnosis)
        print(describe(info))
    if args.html:
        from nanscope.report import write_report

        doc = info.diagnosis.to_dict()
        doc["bundle"] = info.manifest
        out = write_report(args.html, doc, bundle=info, source_search=[info.folder])
        print(f"HTML report written to {out}", file=sys.stderr if args.json else sys.stdout)
    sys.stdout.flush()
    return 0
