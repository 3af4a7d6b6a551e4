"""``nanscope demo``: the built-in example. A small DeepLabv3-style segmentation run whose
validation loss goes NaN, diagnosed on screen in a few seconds (``nanscope.torch.demo``).

Exit status: 0 when the built-in failure was diagnosed as expected, 1 when it was not, 2 when
PyTorch is missing or ``--json FILE`` cannot be written (one line, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nanscope.core.errors import MissingDependencyError
from nanscope.core.io import check_writable, write_json

DEFAULT_HTML = "nanscope-reports/demo.html"
HELP = "the built-in example: a segmentation run whose validation goes NaN, diagnosed in seconds"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", metavar="FILE", help="also write the diagnosis as JSON (the contract's schema)"
    )
    p.add_argument(
        "--html",
        metavar="FILE",
        default="nanscope-reports/demo.html",
        help="where the HTML report goes (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=6,
        help="training steps before validation (default: %(default)s)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401  (the demo is a PyTorch run)
    except ImportError as err:
        raise MissingDependencyError("torch", "torch") from err
    if args.json:
        check_writable(args.json, what="JSON report")
    if args.html:
        if args.html == DEFAULT_HTML:  # nanscope's own folder for reports (gitignored): create it
            os.makedirs(os.path.dirname(DEFAULT_HTML), exist_ok=True)
        check_writable(args.html, what="HTML report")
    if args.steps < 1:
        from nanscope.core.errors import BadInputError

        raise BadInputError(f"--steps must be at least 1, not {args.steps}")
    from nanscope.torch.demo import run_demo

    result = run_demo(steps=args.steps, say=lambda line: print(line, flush=True))
    d = result.diagnosis
    if d is None:
        print(
            "nanscope demo: nothing non-finite was found; the built-in failure did not happen",
            file=sys.stderr,
        )
        return 1
    print()
    print(str(d))
    print()
    if args.json:
        write_json(args.json, d.to_dict())
        print(f"diagnosis written to {args.json}")
    if args.html:
        print(f"report written to {_write_html(args.html, result)}: open it in a browser")
    if result.as_expected:
        print(
            f"nanscope demo: diagnosed as expected ({d.category}, validation batch {d.details.get('batch')}) "
            f"in {result.seconds:.1f} s"
        )
        return 0
    print(
        f"nanscope demo: expected invalid_target on validation batch 5, got {d.category}",
        file=sys.stderr,
    )
    return 1


def _write_html(path: str, result) -> str:
    """The demo's page, with the bad validation frame and its mask as thumbnails."""
    from nanscope.report import write_report

    d = result.diagnosis
    samples = None
    index = d.details.get("batch")
    if isinstance(index, int) and 0 <= index < len(result.val_batches):
        image, mask = result.val_batches[index]
        rows = d.samples or list(range(image.shape[0]))
        samples = ({"image": image[rows].numpy(), "mask": mask[rows].numpy()}, rows)
    return (
        Path(write_report(path, d, samples=samples, source_search=[os.getcwd()])).resolve().as_uri()
    )
