"""Floating-point limits by dtype name, without importing numpy's or a framework's finfo.

Names are the ones frameworks print (``float16``, ``bfloat16``, ``float32``, ``float64``);
``torch.float16`` and ``tf.float16`` are normalized by :func:`dtype_name`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FloatLimits:
    name: str
    max: float  # largest finite value
    tiny: float  # smallest positive normal value
    subnormal: float  # smallest positive subnormal value
    eps: float  # distance from 1.0 to the next value


LIMITS = {
    "float16": FloatLimits(
        "float16", 65504.0, 6.103515625e-05, 5.960464477539063e-08, 0.0009765625
    ),
    "bfloat16": FloatLimits(
        "bfloat16", 3.3895313892515355e38, 1.1754943508222875e-38, 9.183549615799121e-41, 0.0078125
    ),
    "float32": FloatLimits(
        "float32",
        3.4028234663852886e38,
        1.1754943508222875e-38,
        1.401298464324817e-45,
        1.1920928955078125e-07,
    ),
    "float64": FloatLimits(
        "float64", 1.7976931348623157e308, 2.2250738585072014e-308, 5e-324, 2.220446049250313e-16
    ),
}


def dtype_name(dtype: object) -> str:
    """``torch.float16``, ``<dtype: 'float16'>``, ``np.float16`` or ``"half"`` -> ``"float16"``.

    >>> dtype_name("torch.float16"), dtype_name("half"), dtype_name("<dtype: 'bfloat16'>")
    ('float16', 'float16', 'bfloat16')
    """
    text = str(getattr(dtype, "name", None) or dtype)
    text = text.replace("torch.", "").replace("<dtype: '", "").replace("'>", "").strip()
    return {
        "half": "float16",
        "float": "float32",
        "double": "float64",
        "mixed_float16": "float16",
        "mixed_bfloat16": "bfloat16",
    }.get(text, text)


def limits(dtype: object) -> FloatLimits | None:
    """Limits of a floating dtype, or None for integer and other dtypes."""
    return LIMITS.get(dtype_name(dtype))
