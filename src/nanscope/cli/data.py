"""``nanscope data PATH``: audit a dataset before training (the CLI shell over nanscope.data.audit).

Parses, calls the API, renders; no logic. Exit status: 0 clean (warnings allowed), 1 problems
found, 2 bad usage or unreadable input (one line).
"""

from __future__ import annotations

import argparse

from nanscope.core.io import check_writable, refuse_same_file, write_json
from nanscope.report.console import echo

HELP = "audit a dataset: NaN/Inf inputs, bad labels and masks, constant images, statistics"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        metavar="PATH",
        help="image folder (with images/ + masks/ or one folder per class), .npy, .npz, .h5",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        help="write the findings and statistics as JSON (the contract's schema)",
    )
    p.add_argument(
        "--html",
        metavar="FILE",
        help="also write a self-contained HTML report (findings, histogram, sample thumbnails)",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        metavar="N",
        help="labels must lie in [0, N); enables the unused-class check",
    )
    p.add_argument(
        "--ignore-index",
        type=int,
        metavar="I",
        help="the label the loss ignores (e.g. 255 or -100)",
    )
    p.add_argument(
        "--masks",
        metavar="DIR",
        help="mask folder matching the image folder PATH (same file names)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        metavar="N",
        help="processes decoding image folders, threads reducing arrays (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="never draw the progress bar")


def main(args: argparse.Namespace) -> int:
    from nanscope.core.errors import BadInputError
    from nanscope.data import audit

    if args.workers < 1:
        raise BadInputError("--workers must be at least 1")
    if args.num_classes is not None and args.num_classes < 1:
        raise BadInputError("--num-classes must be at least 1")
    if args.json:
        check_writable(args.json, what="JSON report")
        refuse_same_file(args.path, args.json)
    if args.html:
        check_writable(args.html, what="HTML report")
        refuse_same_file(args.path, args.html)
    report = audit(
        args.path,
        num_classes=args.num_classes,
        ignore_index=args.ignore_index,
        masks=args.masks,
        workers=args.workers,
        progress=False if args.no_progress else None,
    )
    echo(report)
    if args.json:
        write_json(args.json, report.to_dict())
    if args.html:
        import os

        from nanscope.report import write_report

        root = args.path if os.path.isdir(args.path) else None
        print(f"HTML report written to {write_report(args.html, report, data_root=root)}")
    return report.exit_code
