"""``nanscope report BUNDLE_OR_JSON [-o FILE.html]``: one self-contained HTML page of a diagnosis
or an audit (the CLI shell over ``nanscope.report``).

Framework-free: reads the JSON (a repro bundle's diagnosis.json and samples.npz, never its
state file). Exit status: 0 when the page was written (rendering is not diagnosing), 2 for bad
usage or an unreadable input (one line).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanscope.core.errors import BadInputError
from nanscope.core.io import check_writable, refuse_same_file

HELP = "write one self-contained HTML page of a diagnosis, repro bundle or audit (plots, samples, fixes)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "input",
        metavar="BUNDLE_OR_JSON",
        help="a repro bundle folder, or a JSON file written by --json (run, demo, data, inspect)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="the HTML file to write (default: the JSON's name with .html; BUNDLE/report.html for a bundle)",
    )
    p.add_argument(
        "--data",
        metavar="PATH",
        help="the audited dataset folder, to show the offending files (nanscope data)",
    )


def main(args: argparse.Namespace) -> int:
    from nanscope.report import default_output, load, render, write_html

    loaded = load(args.input)
    out = Path(args.output) if args.output else default_output(args.input)
    check_writable(out, what="HTML report")
    refuse_same_file(args.input, out)
    audit = "findings" in loaded.doc
    if args.data and not audit:
        raise BadInputError(
            "--data is for audits (the JSON of `nanscope data`); this is a diagnosis"
        )
    if args.data and not Path(args.data).exists():
        raise BadInputError(f"--data {args.data!r} does not exist")
    kw: dict = {"data_root": args.data} if audit else {"source_search": [loaded.folder, Path.cwd()]}
    if loaded.bundle is not None:
        kw["bundle"] = loaded.bundle
    page = render(loaded.doc, **kw)
    write_html(out, page)
    print(
        f"nanscope report: wrote {out} ({len(page.encode()) // 1024 + 1} KiB); open it in a browser"
    )
    return 0
