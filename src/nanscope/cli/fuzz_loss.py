"""``nanscope fuzz-loss MODULE:FUNCTION [--example FILE.npz] [--json FILE]``.

Loads the user's module first and only then looks at ``sys.modules`` to pick the framework,
so nanscope never imports a framework the loss does not use. ``--example`` is read with
``numpy.load(allow_pickle=False)``: positional arrays are ``arr_0``, ``arr_1``, ... (what
``np.savez(path, a, b)`` writes); other names are passed as keyword arguments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import zipfile
from pathlib import Path

from nanscope.core.errors import BadInputError
from nanscope.core.io import check_writable, write_json

HELP = "try a loss function on edge cases (probabilities 0/1, logits ±1e4, empty masks, ...)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        metavar="MODULE:FUNCTION",
        help="the loss, as an importable module (my_pkg.losses:dice) or a file (losses.py:dice)",
    )
    p.add_argument(
        "--example",
        metavar="FILE.npz",
        help="one real batch of the loss's inputs (np.savez); default: guessed from parameter names",
    )
    p.add_argument(
        "--ignore-index",
        type=int,
        default=None,
        help="the label your loss ignores (default: try -100 and 255)",
    )
    p.add_argument(
        "--json", metavar="FILE", help="write the findings as JSON (the contract's audit schema)"
    )


def load_function(target: str):
    """``pkg.mod:fn`` or ``path/file.py:fn`` -> the function (BadInputError when missing)."""
    module_name, sep, func_name = target.rpartition(":")
    if not sep or not module_name or not func_name:
        raise BadInputError(f"expected MODULE:FUNCTION, got {target!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise BadInputError(f"no such file: {module_name}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        sys.path.insert(0, str(path.resolve().parent))
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise BadInputError(
                f"importing {module_name!r} failed: {type(err).__name__}: {err}"
            ) from None
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                raise BadInputError(
                    f"cannot import module {module_name!r} (not found from {os.getcwd()})"
                ) from None
            raise BadInputError(f"importing {module_name!r} failed: {err}") from None
        except Exception as err:
            raise BadInputError(
                f"importing {module_name!r} failed: {type(err).__name__}: {err}"
            ) from None
    fn = getattr(module, func_name, None)
    for part in func_name.split(".")[1:] if fn is None and "." in func_name else []:
        fn = getattr(
            fn if fn is not None else getattr(module, func_name.split(".")[0], None), part, None
        )
    if not callable(fn):
        raise BadInputError(f"module {module_name!r} has no function {func_name!r}")
    return fn


def load_example(path: str):
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"no such example file: {path}")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise BadInputError(
            f"cannot read example {path!r} as .npz: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    positional = sorted(
        (k for k in arrays if k.startswith("arr_") and k[4:].isdigit()), key=lambda k: int(k[4:])
    )
    if positional and len(positional) == len(arrays):
        return [arrays[k] for k in positional]
    if positional:
        raise BadInputError(
            f"example {path!r} mixes positional (arr_N) and named arrays; use one or the other"
        )
    return arrays


def main(args: argparse.Namespace) -> int:
    if args.json:
        check_writable(args.json, what="JSON report")
    example = load_example(args.example) if args.example else None
    fn = load_function(args.target)
    from nanscope.fuzz import fuzz_loss

    report = fuzz_loss(fn, example, ignore_index=args.ignore_index)
    print(report)
    if args.json:
        write_json(args.json, report.to_dict())
    return report.exit_code
