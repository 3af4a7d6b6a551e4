"""nanscope: find where NaN/Inf came from in training and inference, say why, and contain it.

Importing ``nanscope`` imports no framework: ``nanscope.torch`` and ``nanscope.keras`` are
imported when you use them, and the names below load lazily.

    >>> import nanscope
    >>> nanscope.Category.OP_DOMAIN
    <Category.OP_DOMAIN: 'op_domain'>
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Diagnosis": "nanscope.core.diagnosis",
    "Finding": "nanscope.core.diagnosis",
    "AuditReport": "nanscope.core.diagnosis",
    "Location": "nanscope.core.diagnosis",
    "Category": "nanscope.core.enums",
    "Phase": "nanscope.core.enums",
    "Policy": "nanscope.core.enums",
    "OpKind": "nanscope.core.enums",
    "NanscopeError": "nanscope.core.errors",
    "NonFiniteError": "nanscope.core.errors",
    "BadInputError": "nanscope.core.errors",
    "fuzz_loss": "nanscope.fuzz",
    "audit_data": "nanscope.data.audit",
}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in ("torch", "keras", "losses", "data", "audit"):
        return importlib.import_module(f"nanscope.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nanscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
