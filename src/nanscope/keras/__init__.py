"""nanscope for Keras 3 on TensorFlow.

    Guard                    a ``model.fit`` callback: a non-finite batch is not applied,
                             kept, and diagnosed (raise / skip / stop / warn)
    diagnose                 one instrumented step: first layer, TF op, samples, cause
    diagnose_eval            "trains fine, predict is NaN": first bad layer, train-vs-inference,
                             BatchNormalization moving statistics
    repair_norm_statistics   recompute BatchNormalization moving statistics from data
    headroom                 per-layer max |activation| against float16 limits

Everything here imports tensorflow/keras; nothing imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

try:
    import keras as _keras  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised without keras installed
    from nanscope.core.errors import MissingDependencyError

    raise MissingDependencyError("keras/tensorflow", "keras") from _err

_LAZY = {
    "Guard": "nanscope.keras.guard",
    "diagnose": "nanscope.keras.diagnose_step",  # not diagnose.py: the submodule would shadow the function
    "diagnose_eval": "nanscope.keras.evaluate",
    "repair_norm_statistics": "nanscope.keras.repair",
    "headroom": "nanscope.keras.amp",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nanscope.keras' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
