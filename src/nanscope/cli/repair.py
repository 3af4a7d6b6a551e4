"""``nanscope repair CHECKPOINT -o NEW (--recalibrate-bn --data PATH | --reset-bn)``.

Writes a repaired copy of a checkpoint whose normalization statistics are corrupt. Design
constraints:
    - Never writes over the input (``refuse_same_file``); the output is written atomically, and
      only after the repaired model's eval-mode outputs were checked finite on the data.
    - PyTorch: the model is built by ``--model package.module:factory`` (the checkpoint holds
      weights, not code) and loaded with ``weights_only=True`` unless ``--trust-pickle``;
      recalibration is ``nanscope.torch.repair_norm_statistics``. Keras: the model loads from the
      ``.keras`` file in safe mode (or ``--model`` + weights), and recalibration is
      ``nanscope.keras.repair_norm_statistics``, imported only when a Keras file is repaired.
    - ``--reset-bn`` is the fallback (mean 0, variance 1) and says what it costs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nanscope.core.errors import BadInputError
from nanscope.core.io import atomic_write, check_writable, refuse_same_file

HELP = "write a repaired copy of a checkpoint: recompute (or reset) BatchNorm statistics"

RESET_COST = (
    "reset BatchNorm statistics to mean 0, variance 1: outputs are finite again, but what the model "
    "learned about activation scale is lost and accuracy usually drops; prefer --recalibrate-bn --data PATH"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=".pt/.pth, .safetensors, .keras or .h5")
    p.add_argument(
        "-o",
        "--output",
        metavar="NEW",
        required=True,
        help="where to write the repaired copy (never the input)",
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="recompute BatchNorm statistics from --data (train-mode passes, cumulative average)",
    )
    how.add_argument(
        "--reset-bn",
        action="store_true",
        help="fallback: reset BatchNorm statistics to mean 0, variance 1",
    )
    p.add_argument(
        "--data",
        metavar="PATH",
        help="training-like inputs: an image folder, .npy/.npz/.h5, or package.module:function returning batches",
    )
    p.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="builds the model: package.module:function (PyTorch; Keras .weights.h5)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="N",
        help="batch size for --data files (default: %(default)s)",
    )
    p.add_argument(
        "--max-batches",
        type=int,
        default=100,
        metavar="N",
        help="batches to average over (default: %(default)s)",
    )
    p.add_argument(
        "--mean",
        metavar="M[,M...]",
        help="per-channel mean subtracted from image inputs scaled to 0..1",
    )
    p.add_argument(
        "--std", metavar="S[,S...]", help="per-channel std dividing image inputs scaled to 0..1"
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow full unpickling of a PyTorch file (runs code from it)",
    )


def main(args: argparse.Namespace) -> int:
    src = Path(args.checkpoint)
    if not src.is_file():
        raise BadInputError(
            f"{str(src)!r} does not exist" if not src.exists() else f"{str(src)!r} is not a file"
        )
    if args.recalibrate_bn and not args.data:
        raise BadInputError("--recalibrate-bn needs training-like inputs: add --data PATH")
    if args.batch_size < 1 or args.max_batches < 1:
        raise BadInputError("--batch-size and --max-batches must be at least 1")
    out = Path(args.output)
    refuse_same_file(src, out)
    check_writable(out, what="repaired checkpoint")
    if src.suffix.lower() in (".keras", ".h5", ".hdf5"):
        return _repair_keras(args, src, out)
    return _repair_torch(args, src, out)


# -- shared ---------------------------------------------------------------------------------------


def load_factory(spec: str):
    """``package.module:function`` -> the function (the current folder is importable)."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise BadInputError(f"--model {spec!r}: expected package.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except Exception as err:
        raise BadInputError(
            f"cannot import {mod_name!r} for {spec!r}: {type(err).__name__}: {err}"
        ) from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise BadInputError(f"{mod_name!r} has no function {fn_name!r}")
    return fn


def _floats(text: str | None, what: str) -> np.ndarray | None:
    if not text:
        return None
    try:
        return np.array([float(v) for v in text.split(",")], dtype=np.float32)
    except ValueError:
        raise BadInputError(f"{what} {text!r}: expected numbers separated by commas") from None


def input_batches(args: argparse.Namespace, *, channels_first: bool) -> Iterator[np.ndarray]:
    """Batches of model inputs from ``--data``: images scaled to 0..1 (then --mean/--std), arrays as stored."""
    from nanscope.data import readers

    data = args.data
    if ":" in data and not Path(data).exists():
        yield from load_factory(data)()
        return
    mean, std = _floats(args.mean, "--mean"), _floats(args.std, "--std")
    src = readers.open_source(data)
    pending: list[np.ndarray] = []
    try:
        for batch in src.batches:
            if not batch.inputs:
                continue
            x = next(iter(batch.inputs.values()))
            if src.unit == "files":  # decoded images: HWC integers -> float in 0..1
                img = x[0]
                scale = (
                    255.0 if img.dtype == np.uint8 else (65535.0 if img.dtype == np.uint16 else 1.0)
                )
                img = img.astype(np.float32) / scale
                if img.ndim == 2:
                    img = img[..., None]
                if mean is not None:
                    img = img - mean
                if std is not None:
                    img = img / std
                if channels_first:
                    img = np.transpose(img, (2, 0, 1))
                if pending and pending[0].shape != img.shape:
                    yield np.stack(pending)
                    pending = []
                pending.append(np.ascontiguousarray(img))
                if len(pending) == args.batch_size:
                    yield np.stack(pending)
                    pending = []
            else:
                x = np.asarray(x)
                x = x.astype(np.float32) if x.dtype.kind in "iub" or x.dtype == np.float64 else x
                for i in range(0, len(x), args.batch_size):
                    yield np.ascontiguousarray(x[i : i + args.batch_size])
        if pending:
            yield np.stack(pending)
    finally:
        src.close()


# -- PyTorch ----------------------------------------------------------------------------------------


def _repair_torch(args: argparse.Namespace, src: Path, out: Path) -> int:
    import torch

    from nanscope.audit.checkpoint import read_checkpoint
    from nanscope.torch.audit import load_torch_object, split_checkpoint
    from nanscope.torch.repair import repair_norm_statistics, reset_norm_statistics

    safetensors = src.suffix.lower() == ".safetensors"
    if safetensors:
        ck = read_checkpoint(src)
        obj = {n: torch.from_numpy(np.array(a)) for n, a in ck.tensors.items()}
        model_key, sd = None, obj
    else:
        obj = load_torch_object(src, trust_pickle=args.trust_pickle)
        model_key, sd, _ = split_checkpoint(obj)
    if not sd:
        raise BadInputError(f"{str(src)!r} holds no model state dict to repair")
    model = None
    if args.model:
        model = load_factory(args.model)()
        if not isinstance(model, torch.nn.Module):
            raise BadInputError(
                f"--model {args.model!r} returned a {type(model).__name__}, not a torch.nn.Module"
            )
        try:
            model.load_state_dict(sd)
        except Exception as err:
            first = str(err).strip().splitlines()
            raise BadInputError(
                f"the checkpoint does not fit the model from --model {args.model!r}: "
                + " ".join(first[:2])[:200]
            ) from None
        model.eval()
    elif args.recalibrate_bn:
        raise BadInputError(
            "--recalibrate-bn runs the model, and a checkpoint holds weights, not code: "
            "add --model package.module:function that builds it"
        )

    def batches():
        return (
            torch.from_numpy(b) if isinstance(b, np.ndarray) else b
            for b in input_batches(args, channels_first=True)
        )

    try:
        if args.recalibrate_bn:
            report = repair_norm_statistics(
                model, batches(), max_batches=args.max_batches, verify=True, verify_batches=8
            )
        elif model is not None:
            report = reset_norm_statistics(model)
            if args.data:
                report.outputs_finite = _torch_outputs_finite(model, batches())
    except BadInputError:
        raise
    except Exception as err:  # the user's model and data do not fit together: their input, one line
        raise BadInputError(
            f"the model from --model failed on the --data batches: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}"
        ) from None
    if model is not None:
        new_sd = model.state_dict()
    else:  # reset on the tensors themselves: no model code needed
        report, new_sd = _reset_state_dict(sd)
    print(report)
    if args.reset_bn:
        print("note: " + RESET_COST)
    if report.outputs_finite is False:
        print(
            "nanscope repair: the repaired model still gives non-finite outputs on the data; nothing written "
            f"(run `nanscope inspect {src.name}` for other bad tensors)",
            file=sys.stderr,
        )
        return 1
    if not report.layers:
        print(
            "nanscope repair: no BatchNorm layer with running statistics found; nothing written",
            file=sys.stderr,
        )
        return 1
    if safetensors:
        from safetensors.torch import save_file

        atomic_write(
            out,
            lambda tmp: save_file({k: v.contiguous() for k, v in new_sd.items()}, str(tmp)),
            what="repaired checkpoint",
        )
    else:
        if model_key is None:
            obj = new_sd if not isinstance(obj, torch.nn.Module) else obj
        elif isinstance(obj[model_key], torch.nn.Module):
            obj[model_key].load_state_dict(new_sd)
        else:
            obj[model_key] = new_sd
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(new_sd)
        atomic_write(out, lambda tmp: torch.save(obj, tmp), what="repaired checkpoint")
    verified = (
        "eval-mode outputs verified finite on the data"
        if report.outputs_finite
        else "not verified on data (no --model/--data)"
    )
    print(f"wrote {out} ({verified})")
    return 0


def _torch_outputs_finite(model, batches, limit: int = 8) -> bool:
    import torch

    from nanscope.torch.repair import _finite

    model.eval()
    with torch.no_grad():
        for i, x in enumerate(batches):
            if i >= limit:
                break
            if not _finite(model(x)):
                return False
    return True


def _reset_state_dict(sd: dict):
    import torch

    from nanscope.torch.repair import NormRepairReport

    report = NormRepairReport(method="reset")
    new = dict(sd)
    for name, t in sd.items():
        layer, _, leaf = name.rpartition(".")
        if leaf == "running_var":
            v = t.detach().float().numpy()
            f = v[np.isfinite(v)]
            before = {
                "min": float(f.min()) if f.size else None,
                "max": float(f.max()) if f.size else None,
                "nonfinite": int(v.size - f.size),
                "negative": int((f < 0).sum()),
            }
            new[name] = torch.ones_like(t)
            if f"{layer}.running_mean" in sd:
                new[f"{layer}.running_mean"] = torch.zeros_like(sd[f"{layer}.running_mean"])
            if f"{layer}.num_batches_tracked" in sd:
                new[f"{layer}.num_batches_tracked"] = torch.zeros_like(
                    sd[f"{layer}.num_batches_tracked"]
                )
            report.layers[layer] = {
                "before": before,
                "after": {"min": 1.0, "max": 1.0, "nonfinite": 0, "negative": 0},
                "changed": True,
            }
    return report, new


# -- Keras ------------------------------------------------------------------------------------------


def _repair_keras(args: argparse.Namespace, src: Path, out: Path) -> int:
    from nanscope.audit.checkpoint import read_checkpoint

    suffix = ".weights.h5" if args.model else ".keras"
    if not out.name.endswith(suffix):
        raise BadInputError(f"Keras writes {suffix} files here: name the output ...{suffix}")
    read_checkpoint(src)  # one-line errors for truncated / corrupt files before Keras sees them
    try:
        import keras

        from nanscope.keras.repair import repair_norm_statistics
    except ImportError as err:
        raise BadInputError(
            f"repairing a Keras file needs keras/tensorflow and nanscope.keras.repair: {err}"
        ) from None
    try:
        if args.model:
            model = load_factory(args.model)()
            model.load_weights(src)
        else:
            model = keras.saving.load_model(src, safe_mode=True)
    except BadInputError:
        raise
    except Exception as err:
        raise BadInputError(
            f"Keras cannot load {str(src)!r}: {' '.join(str(err).split())[:200]}"
        ) from None
    data = list(input_batches(args, channels_first=False)) if args.data else None
    try:
        if args.recalibrate_bn:
            result = repair_norm_statistics(
                model, data, max_batches=args.max_batches, batch_size=args.batch_size
            )
        else:
            import warnings

            with warnings.catch_warnings():  # the CLI prints the cost itself (RESET_COST)
                warnings.simplefilter("ignore", UserWarning)
                result = repair_norm_statistics(model, None, reset=True)
        finite = None
        if data:
            finite = all(
                bool(np.all(np.isfinite(np.asarray(model(x, training=False))))) for x in data[:8]
            )
    except BadInputError:
        raise
    except Exception as err:  # the model and the data do not fit together: the user's input
        raise BadInputError(
            f"the model failed on the --data batches: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}"
        ) from None
    print(result)
    if args.reset_bn:
        print("note: " + RESET_COST)
    if data:
        if not finite:
            print(
                "nanscope repair: the repaired model still gives non-finite outputs on the data; nothing written",
                file=sys.stderr,
            )
            return 1
    if not result.layers:
        print(
            "nanscope repair: no BatchNormalization layer found; nothing written", file=sys.stderr
        )
        return 1
    save = model.save_weights if args.model else model.save
    atomic_write(
        out, lambda tmp: save(str(tmp)), what="repaired checkpoint", suffix=".part" + suffix
    )
    print(
        f"wrote {out} ("
        + ("eval-mode outputs verified finite on the data" if finite else "not verified on data")
        + ")"
    )
    return 0
