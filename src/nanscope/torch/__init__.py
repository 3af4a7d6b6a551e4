"""nanscope for PyTorch.

    Guard                    wraps your optimizer step: checks loss, gradients, parameters and
                             buffers with one fused reduction; raise / skip / stop / warn
    diagnose                 one instrumented step: producer op, module, line, samples, cause
    diagnose_eval            "training is fine, validation is NaN": bad batches, corrupt BN stats
    replay                   reproduce a saved repro bundle bit-for-bit
    repair_norm_statistics   recompute BatchNorm running statistics from data
    headroom                 per-layer max |activation| / |gradient| against float16 limits
    watch_scaler             explain GradScaler's skipped steps
    locate_overflow          the first module whose float16 output overflowed (float32 proves it)

Everything here imports torch; nothing imports tensorflow.
"""

from __future__ import annotations

import importlib
from typing import Any

try:
    import torch as _torch  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised without torch installed
    from nanscope.core.errors import MissingDependencyError

    raise MissingDependencyError("torch", "torch") from _err

_LAZY = {
    "Guard": "nanscope.torch.guard",
    "diagnose": "nanscope.torch.diagnose",
    "diagnose_eval": "nanscope.torch.evaluate",
    "replay": "nanscope.torch.bundle",
    "repair_norm_statistics": "nanscope.torch.repair",
    "headroom": "nanscope.torch.amp",
    "watch_scaler": "nanscope.torch.amp",
    "locate_overflow": "nanscope.torch.amp",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nanscope.torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


# ``diagnose`` names both a submodule and its function. Importing the submodule binds the
# module as an attribute of this package, which would shadow the function for good; bind the
# function now, after the submodule is loaded, so ``nanscope.torch.diagnose(...)`` always works.
from nanscope.torch.diagnose import diagnose  # noqa: E402, F401
