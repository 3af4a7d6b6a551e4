"""Losses that cannot NaN, for PyTorch and Keras/TensorFlow tensors alike.

``nanscope.losses.safe_log(x)`` works on a torch tensor or a TensorFlow/Keras tensor: the
backend is picked per call from the type of the first tensor argument.

Design constraints (as in einops ``_backends.py``):
    - Importing this module imports no framework. A backend is considered only when its
      framework is already in ``sys.modules`` (the user imported it), so an isinstance test
      can never be what pulls torch or tensorflow in.
    - Each function has the same name, arguments and meaning in both backends
      (``nanscope.torch.losses`` and ``nanscope.keras.losses``); this module only dispatches.

Example:
    >>> import nanscope.losses as L
    >>> sorted(L.__all__)[:3]
    ['binary_cross_entropy', 'cross_entropy', 'dice_loss']
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

__all__ = [
    "binary_cross_entropy",
    "cross_entropy",
    "dice_loss",
    "double_where",
    "focal_loss",
    "masked_softmax",
    "safe_div",
    "safe_log",
    "safe_norm",
    "safe_sqrt",
    "tversky_loss",
]


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_tensorflow(x: Any) -> bool:
    tf = sys.modules.get("tensorflow")
    if tf is not None and (
        isinstance(x, tf.Tensor | tf.Variable) or type(x).__name__ == "EagerTensor"
    ):
        return True
    keras = sys.modules.get("keras")
    return (
        keras is not None
        and type(x).__name__ in ("KerasTensor", "Variable")
        and "keras" in type(x).__module__
    )


def backend_for(*tensors: Any) -> Any:
    """The backend module (``nanscope.torch.losses`` / ``nanscope.keras.losses``) for these tensors.

    Raises:
        TypeError: none of the arguments is a tensor of an imported framework.
    """
    for x in tensors:
        if _is_torch(x):
            return importlib.import_module("nanscope.torch.losses")
        if _is_tensorflow(x):
            return importlib.import_module("nanscope.keras.losses")
    kinds = ", ".join(type(x).__name__ for x in tensors) or "nothing"
    raise TypeError(f"nanscope.losses expects torch or TensorFlow/Keras tensors, got {kinds}")


def user_stacklevel() -> int:
    """``warnings.warn`` stacklevel of the caller's first frame outside nanscope.

    The backends warn through it, so a warning points at the user's line whether they
    called ``nanscope.losses.f`` (one more frame) or ``nanscope.torch.losses.f``.
    """
    root = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(root):
        level, frame = level + 1, frame.f_back
    return level


def _dispatch(name: str):
    def call(*args: Any, **kwargs: Any) -> Any:
        backend = backend_for(
            *args, *(v for k, v in kwargs.items() if k in ("x", "logits", "probs"))
        )
        return getattr(backend, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = (
        f"``{name}`` for torch or TensorFlow tensors: see ``nanscope.torch.losses.{name}`` "
        f"and ``nanscope.keras.losses.{name}`` (same arguments)."
    )
    return call


binary_cross_entropy = _dispatch("binary_cross_entropy")
cross_entropy = _dispatch("cross_entropy")
dice_loss = _dispatch("dice_loss")
focal_loss = _dispatch("focal_loss")
masked_softmax = _dispatch("masked_softmax")
safe_div = _dispatch("safe_div")
safe_log = _dispatch("safe_log")
safe_norm = _dispatch("safe_norm")
safe_sqrt = _dispatch("safe_sqrt")
tversky_loss = _dispatch("tversky_loss")


def double_where(condition: Any, fn: Any, x: Any, **kwargs: Any) -> Any:
    """``where(condition, fn(x), otherwise)`` with a finite gradient (see the backends)."""
    return backend_for(x, condition).double_where(condition, fn, x, **kwargs)
