"""Read PyTorch checkpoints for ``nanscope inspect`` / ``repair`` without running code from them.

Design constraints:
    - ``torch.load(weights_only=True)`` always, unless the caller passes ``trust_pickle=True``
      (the CLI's ``--trust-pickle``). A file that needs more than tensors and plain containers
      is refused with one line that names the flag; nothing from it runs.
    - State dicts and full training checkpoints (``{"model": ..., "optimizer": ...}``) are both
      understood; optimizer state (``exp_avg_sq``...) is named after its parameter when the
      parameter order can be matched to the state dict.
    - Only plain numpy leaves this module, so the rules stay framework-free.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanscope.audit.checkpoint import Checkpoint
from nanscope.audit.torchfile import _short  # one wording of a reader's error
from nanscope.core.errors import BadInputError
from nanscope.core.limits import dtype_name
from nanscope.torch import _util

MODEL_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "model_state")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt", "optimizer_state")
_BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


def load_torch_object(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` on CPU, weights only unless ``trust_pickle``; one-line errors."""
    p = Path(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        if not trust_pickle and "weights only load failed" in str(err).lower():
            raise BadInputError(
                f"{str(p)!r} needs full unpickling (it stores Python objects, not only tensors), which can run "
                "arbitrary code; nanscope refused to load it. Re-run with --trust-pickle only if you trust its source",
                path=str(p),
            ) from None
        raise BadInputError(
            f"{str(p)!r} is not a readable PyTorch file (truncated or corrupt): {_short(err)}",
            path=str(p),
        ) from None
    except Exception as err:
        raise BadInputError(
            f"{str(p)!r} is not a readable PyTorch file (truncated or corrupt): {_short(err)}",
            path=str(p),
        ) from None


def is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def split_checkpoint(obj: Any) -> tuple[str | None, dict[str, torch.Tensor], dict | None]:
    """(key of the model state dict or None when ``obj`` is one, the state dict, the optimizer state)."""
    if isinstance(obj, torch.nn.Module):
        return None, obj.state_dict(), None
    if is_state_dict(obj):
        return None, obj, None
    if not isinstance(obj, dict):
        raise BadInputError(
            f"the checkpoint holds a {type(obj).__name__}, not a state dict or a dict of them"
        )
    model_key = next(
        (
            k
            for k in MODEL_KEYS
            if k in obj and (is_state_dict(obj[k]) or isinstance(obj[k], torch.nn.Module))
        ),
        None,
    )
    if model_key is None:
        model_key = next((k for k, v in obj.items() if is_state_dict(v)), None)
    sd = {}
    if model_key is not None:
        v = obj[model_key]
        sd = v.state_dict() if isinstance(v, torch.nn.Module) else v
    opt_key = next(
        (k for k in OPTIMIZER_KEYS if isinstance(obj.get(k), dict) and "state" in obj[k]), None
    )
    if (
        opt_key is None
        and isinstance(obj.get("optimizer_states"), list)
        and obj["optimizer_states"]
    ):
        first = obj["optimizer_states"][0]  # PyTorch Lightning: one state dict per optimizer
        return model_key, sd, first if isinstance(first, dict) and "state" in first else None
    return model_key, sd, obj[opt_key] if opt_key else None


def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A tensor as numpy (see ``nanscope.torch._util.to_numpy``) and its dtype name."""
    return _util.to_numpy(t), dtype_name(t.dtype)


def read_torch_checkpoint(path: Path, *, trust_pickle: bool = False) -> Checkpoint:
    obj = load_torch_object(path, trust_pickle=trust_pickle)
    model_key, sd, opt = split_checkpoint(obj)
    ck = Checkpoint(Path(path), "torch", "torch")
    for name, t in sd.items():
        ck.tensors[name], ck.dtypes[name] = to_numpy(t)
    if isinstance(obj, dict) and model_key is not None:
        # other tensors of a training checkpoint (EMA weights, scaler state) are audited too
        for k, v in obj.items():
            if k != model_key and is_state_dict(v) and k not in OPTIMIZER_KEYS:
                for name, t in v.items():
                    full = f"{k}.{name}"
                    ck.tensors[full], ck.dtypes[full] = to_numpy(t)
    if opt is not None:
        _read_optimizer(opt, sd, ck)
    if not ck.tensors and not ck.optimizer:
        raise BadInputError(f"{str(path)!r} holds no tensors nanscope can audit")
    return ck


def _read_optimizer(opt: dict, sd: dict[str, torch.Tensor], ck: Checkpoint) -> None:
    groups = opt.get("param_groups") or []
    ids = [i for g in groups for i in g.get("params", [])]
    # Parameters are the state-dict entries that are not buffers, in order (model.parameters()).
    params = [n for n in sd if n.rsplit(".", 1)[-1] not in _BUFFER_LEAVES]
    named = dict(zip(ids, params, strict=False)) if len(params) == len(ids) else {}
    for g in groups:
        for key in ("lr", "eps"):
            v = g.get(key)
            if isinstance(v, float | int) or isinstance(v, torch.Tensor):
                v = float(v)
                ck.hyper[key] = v if key not in ck.hyper or not np.isfinite(v) else ck.hyper[key]
    for pid, state in (opt.get("state") or {}).items():
        label = named.get(pid, f"param {pid}")
        for k, t in state.items():
            if isinstance(t, torch.Tensor):
                full = f"optimizer[{label}].{k}"
                ck.optimizer[full], ck.dtypes[full] = to_numpy(t)
