"""``nanscope inspect CHECKPOINT``: audit a saved model (the CLI shell over nanscope.audit.inspect).

Parses, calls the API, renders; no logic. Exit status: 0 clean (warnings allowed), 1 problems
found, 2 bad usage or an unreadable / refused file (one line).
"""

from __future__ import annotations

import argparse

from nanscope.core.io import check_writable, refuse_same_file, write_json
from nanscope.report.console import echo

HELP = "audit a saved model: NaN/Inf weights, corrupt BatchNorm statistics, float16 headroom"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help=".pt/.pth (state dict or training checkpoint), .safetensors, .keras, .h5",
    )
    p.add_argument(
        "--json", metavar="FILE", help="write the findings and the per-layer table as JSON"
    )
    p.add_argument(
        "--html",
        metavar="FILE",
        help="also write a self-contained HTML report (layer table, float16 headroom, BatchNorm channels)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full unpickling of a PyTorch file that needs it "
        "(runs code from the file: only for files you trust)",
    )


def main(args: argparse.Namespace) -> int:
    from nanscope.audit.checkpoint import read_checkpoint
    from nanscope.audit.inspect import analyze

    if args.json:
        check_writable(args.json, what="JSON report")
        refuse_same_file(args.checkpoint, args.json)
    if args.html:
        check_writable(args.html, what="HTML report")
        refuse_same_file(args.checkpoint, args.html)
    ck = read_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
    report = analyze(
        ck
    )  # = nanscope.audit.inspect(), keeping the tensors for the HTML's channel view
    echo(report)
    if args.json:
        write_json(args.json, report.to_dict())
    if args.html:
        from nanscope.report import write_report

        channels = {
            layer: {n.rsplit(".", 1)[-1]: ck.tensors[n] for n in names if n and n in ck.tensors}
            for layer, names in ck.norm_layers.items()
            if any(layer in f.where_found.get("layers", []) for f in report.findings)
        }
        print(f"HTML report written to {write_report(args.html, report, norm_channels=channels)}")
    return report.exit_code
