"""Small torch helpers shared by nanscope's PyTorch modules: tensor -> numpy summaries,
walking nested batches, module names.

Design constraints: only used to explain a failure or in the cheap boundary checks; never
changes a tensor it looks at (everything works on detached copies); imports torch only.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from nanscope.core.adapter import named_tensors as _named_tensors
from nanscope.core.limits import dtype_name as _dtype_name
from nanscope.core.source import user_location
from nanscope.core.summary import TensorSummary, bad_rows, summarize
from nanscope.core.summary import batch_rows as _batch_rows
from nanscope.torch.distributed import local as _local_shard


def local(t: Any) -> Any:
    """This rank's own values of ``t``: a DTensor's local tensor (its shard under FSDP2 /
    tensor parallel, its replica, or its unreduced partial sum), anything else as it is.

    Every check here looks at local values only: a DTensor's own reduction (``isfinite(t).all()``,
    ``t.sum()``) is a collective, which a rank checking alone would wait in until the process
    group's timeout. Taken under no_grad, where ``to_local()`` is the DTensor's own local tensor
    (the same object on every call, so the tracer can key it by ``id``): no copy, no collective.
    """
    if type(t) is torch.Tensor or not isinstance(t, torch.Tensor):
        return t  # the common case: no lookup
    with torch.no_grad():
        return _local_shard(t)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A detached CPU numpy copy; dtypes numpy lacks (bfloat16, float8, quantized) go through
    float32, complex through its magnitude, sparse through a dense copy. A DTensor: this
    rank's local tensor (``local``)."""
    t = local(t).detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.is_complex():
        t = t.abs()
    if t.dtype == torch.bfloat16 or (t.is_floating_point() and t.element_size() == 1):
        t = t.float()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.numpy()


def summary_of(t: torch.Tensor) -> TensorSummary:
    """``nanscope.core.summary.summarize`` of a tensor, with the tensor's own dtype name."""
    return summarize(to_numpy(t), str(t.dtype))


def samples_of(t: torch.Tensor) -> list[int]:
    """Batch indices (dim 0) of the slices holding NaN/Inf."""
    if t.dim() == 0 or not t.is_floating_point():
        return []
    return bad_rows(to_numpy(t))


def batch_rows(t: torch.Tensor, batch_size: int | None) -> tuple[list[int], list[int]]:
    """(batch rows, positions) of the NaN/Inf in ``t``: ``nanscope.core.summary.batch_rows``."""
    if t.dim() == 0 or not t.is_floating_point():
        return [], []
    return _batch_rows(to_numpy(t), batch_size)


def is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


_WIDE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor that is finite whenever ``t`` is (no synchronization).

    The sum of a tensor is NaN/Inf if any element is, and one reduction pass is much cheaper
    than ``isfinite(t).all()`` (which materializes a bool mask). A finite tensor whose sum
    overflows gives a false alarm only, which ``all_finite`` then settles exactly. float16
    and bfloat16 are summed in float32 so that ordinary activations do not overflow the sum.
    A DTensor: its local tensor only (``local``; no collective).
    """
    return local(t).detach().sum(dtype=_WIDE.get(t.dtype))


def all_finite(t: torch.Tensor) -> bool:
    """True if ``t`` holds no NaN/Inf (integer tensors always do; meta tensors hold no values).
    A DTensor: this rank's local tensor holds none (``local``; no collective)."""
    t = local(t)
    if not is_float(t) or t.numel() == 0 or t.is_meta:
        return True
    if t.is_complex():
        t = t.abs()
    if bool(torch.isfinite(finite_flag(t))):  # cheap path, exact when it says finite
        return True
    # Exact: x * 0 is 0 for every finite x and NaN for NaN/Inf, and a sum of zeros cannot
    # overflow. Two plain passes; ``isfinite(t).all()`` is ~10x slower on this CPU build.
    return bool(torch.isfinite((t.detach() * 0).sum(dtype=_WIDE.get(t.dtype))))


def tree_finite(obj: Any) -> bool:
    """True if no tensor in a tensor or nested tuple / list / dict holds NaN/Inf."""
    return all(all_finite(t) for _, t in named_tensors(obj, ""))


def named_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor in a nested tuple / list / dict.

    >>> [n for n, _ in named_tensors({"image": torch.zeros(1), "extra": [torch.ones(1)]}, "inputs")]
    ['inputs["image"]', 'inputs["extra"][0]']
    """
    return _named_tensors(obj, prefix, TORCH)


def module_names(model: torch.nn.Module | None) -> dict[int, str]:
    """``id(module) -> dotted path`` within ``model`` (the root itself is ``""``)."""
    if model is None:
        return {}
    return {id(m): name for name, m in model.named_modules(remove_duplicate=False)}


def is_norm_layer(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.modules.batchnorm._NormBase)


def is_loss_module(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.modules.loss._Loss)


@contextlib.contextmanager
def quiet_replay() -> Iterator[None]:
    """Silence the warnings of ops nanscope re-runs (the script saw them once already).

    Python-level warnings are ignored; an op called from a replay (outside any torch Python
    binding) reports its C++ warnings through c10's default handler, which writes
    ``[W... file.cpp:N] Warning: ...`` straight to file descriptor 2. Those lines are dropped;
    anything else written to stderr meanwhile is passed on afterwards. Failure path only.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2: only the Python warnings then
        saved = None
    tmp = tempfile.TemporaryFile() if saved is not None else None
    try:
        if tmp is not None:
            os.dup2(tmp.fileno(), 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if tmp is not None and saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [
                ln
                for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                if not _C10_WARNING.match(ln)
            ]
            tmp.close()
            if kept:
                sys.stderr.write("".join(kept))


_C10_WARNING = re.compile(r"^\[W\d{4} [\d:.]+ [^\]]*\] Warning: ")


def grad_fn_of(t: torch.Tensor) -> Any:
    """``t.grad_fn``, or None where torch refuses to say: a view made in no_grad mode whose base
    was later written in place with grad enabled (``nn.Embedding(padding_idx=...)`` makes one)."""
    try:
        return t.grad_fn
    except RuntimeError:
        return None


def settled_norms(norms: list[float], tensors: list[torch.Tensor]) -> list[float]:
    """Per-tensor norms, each Inf one replaced by the exact float64 norm when its tensor is in
    fact finite (its float32 sum of squares overflowed: a norm past ~1.8e19). Failure path only."""
    out = list(norms)
    for i, (n, t) in enumerate(zip(norms, tensors, strict=True)):
        if math.isinf(n) and bool(torch.isfinite(t).all()):
            out[i] = float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64))
    return out


class _TorchAdapter:
    """``nanscope.core.adapter.Adapter`` for PyTorch."""

    name = "torch"
    convention = "torch"

    @staticmethod
    def is_tensor(obj: Any) -> bool:
        return isinstance(obj, torch.Tensor)

    is_float = staticmethod(is_float)
    to_numpy = staticmethod(to_numpy)

    @staticmethod
    def dtype_name(t: torch.Tensor) -> str:
        return _dtype_name(t.dtype)

    @staticmethod
    def all_finite(t: torch.Tensor) -> bool:
        return all_finite(t)

    @staticmethod
    def user_location():
        return user_location()


TORCH = _TorchAdapter()
