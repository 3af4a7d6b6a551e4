"""The TensorFlow/Keras runner of ``nanscope.fuzz_loss``: one edge case -> value, gradient, diagnosis.

Design constraints: each case gets fresh tensors. The cheap check (value and gradients finite
under a ``tf.GradientTape``) runs first; only a failing case is re-run eagerly under
``nanscope.keras.trace.Tracer``, which names the producer op, its line and the cause.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import tensorflow as tf

from nanscope.core import rules
from nanscope.core.enums import Phase
from nanscope.fuzz import Case, CaseResult

__all__ = ["CaseResult", "run_case"]


def _tensors(case: Case) -> tuple[list[Any], dict[str, Any], list[Any]]:
    leaves: list[Any] = []

    def conv(slot: str, a: Any) -> Any:
        if not isinstance(a, np.ndarray):
            return a
        t = tf.constant(np.array(a, copy=True))
        if t.dtype.is_floating:
            if case.float16:
                t = tf.cast(t, tf.float16)
            if slot in case.grad:
                leaves.append(t)
        return t

    args = [conv(str(i), a) for i, a in enumerate(case.args)]
    kwargs = {k: conv(k, v) for k, v in case.kwargs.items()}
    return args, kwargs, leaves


def _loss_of(out: Any) -> Any:
    if isinstance(out, list | tuple) and out:
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return tf.convert_to_tensor(out)


def _finite(t: Any) -> bool:
    return t is None or bool(tf.reduce_all(tf.math.is_finite(tf.cast(t, tf.float32))))


def _run(fn, args, kwargs, leaves, tracer=None):
    with tf.GradientTape() as tape:
        for t in leaves:
            tape.watch(t)
        loss = _loss_of(fn(*args, **kwargs))
        total = tf.reduce_sum(tf.cast(loss, tf.float32))
    if tracer is not None:
        tracer.phase = Phase.BACKWARD
    grads = tape.gradient(total, leaves) if leaves else []
    return loss, grads


def run_case(fn, case: Case) -> CaseResult:
    """Run ``fn`` on one case; diagnose it if the value or a gradient is non-finite."""
    args, kwargs, leaves = _tensors(case)
    try:
        with warnings.catch_warnings():  # the edge cases are meant to provoke warnings
            warnings.simplefilter("ignore")
            loss, grads = _run(fn, args, kwargs, leaves)
    except Exception as err:  # the loss rejects this input
        return CaseResult(
            f"error: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        )
    value_ok = _finite(loss)
    grads_ok = all(_finite(g) for g in grads)
    if value_ok and grads_ok:
        return CaseResult("finite")
    outcome = "non-finite value" if not value_ok else "non-finite gradient"
    args, kwargs, leaves = _tensors(case)
    diagnosis = None
    try:
        from nanscope.keras.trace import Tracer, diagnosis_from_trace

        n = next((int(t.shape[0]) for t in leaves if t.shape.rank), None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Tracer() as tracer:
                tracer.phase = Phase.LOSS
                loss, grads = _run(fn, args, kwargs, leaves, tracer)
        failed = loss if not _finite(loss) else [g for g in grads if not _finite(g)]
        diagnosis = diagnosis_from_trace(tracer.trace, failed, batch_size=n)
    except Exception as err:  # the tracer must never hide the finding
        diagnosis = rules.not_localized(
            "loss" if not value_ok else "gradient", err, framework="keras"
        )
    if diagnosis is None:
        diagnosis = rules.unexplained("loss" if not value_ok else "gradient", framework="keras")
    return CaseResult(outcome, diagnosis)
