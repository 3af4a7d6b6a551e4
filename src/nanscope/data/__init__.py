"""Dataset audits, framework-free: ``nanscope.data.audit(source, ...)`` and ``nanscope data PATH``.

    audit    NaN/Inf inputs, constant samples, un-normalized ranges, per-channel mean/std;
             non-finite or out-of-range labels, masks with no valid pixel, soft labels that
             do not sum to 1, class histogram and classes that never occur

Reads image folders (PNG/JPEG/TIFF, with matching mask folders), ``.npy``/``.npz``, HDF5,
numpy arrays, and torch/TensorFlow datasets the caller already imported. Imports no framework.
"""

from __future__ import annotations

from nanscope.data.audit import audit

__all__ = ["audit"]
