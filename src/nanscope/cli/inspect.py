"""``nanscope inspect CHECKPOINT``: audit a saved model (the CLI shell over nanscope.audit.inspect).

Parses, calls the API, renders; no logic. Exit status: 0 clean (warnings allowed), 1 problems
found, 2 bad usage or an unreadable / refused file (one line).
"""

from __future__ import annotations

import argparse

from nanscope.core.io import check_writable, refuse_same_file, write_json

HELP = "audit a saved model: NaN/Inf weights, corrupt BatchNorm statistics, float16 headroom"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=".pt/.pth (state dict or training checkpoint), .safetensors, .keras, .h5")
    p.add_argument("--json", metavar="FILE", help="write the findings and the per-layer table as JSON")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of a PyTorch file that needs it (runs code from the file: only for files you trust)")


def main(args: argparse.Namespace) -> int:
    from nanscope.audit import inspect

    if args.json:
        check_writable(args.json, what="JSON report")
        refuse_same_file(args.checkpoint, args.json)
    report = inspect(args.checkpoint, trust_pickle=args.trust_pickle)
    print(report)
    if args.json:
        write_json(args.json, report.to_dict())
    return report.exit_code
