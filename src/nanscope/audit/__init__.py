"""Checkpoint audits: ``nanscope.audit.inspect(path)`` and ``nanscope inspect CHECKPOINT``.

    inspect          non-finite parameters and buffers, corrupt BatchNorm statistics, weights and
                     optimizer moments beyond float16, a per-layer table of magnitudes
    read_checkpoint  a .pt/.pth, .safetensors, .keras or .h5 file as numpy arrays, safely

Imports no framework: .pt/.pth files are read by a restricted unpickler of nanscope's own
(torch only for ``trust_pickle`` and for quantized/sparse/nested tensors).
"""

from __future__ import annotations

from nanscope.audit.checkpoint import read_checkpoint
from nanscope.audit.inspect import inspect

__all__ = ["inspect", "read_checkpoint"]
