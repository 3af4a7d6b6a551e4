"""The eager op tracer behind ``diagnose``, ``diagnose_eval`` and ``Guard``: find the first
TensorFlow op whose output is non-finite while its inputs were finite (the *producer*).

Design constraints:
    * Runs only to explain a failure, never on the healthy path: it installs a TensorFlow op
      callback (``tensorflow.python.framework.op_callbacks``, the mechanism behind
      ``tf.debugging.enable_check_numerics``) for the duration of one eager step and removes it
      in ``finally``.
    * The layer of an op is read from Keras' own name-scope stack (every ``Layer.__call__``
      opens one with ``caller=self``), so no layer is patched or wrapped.
    * A non-finite value is followed from op to op by tensor identity: the culprit is the
      producer whose values reached the loss (or the model output, or a gradient), so a NaN
      computed in the branch ``tf.where`` throws away is not blamed for a failure it did not
      cause. Tensors are kept alive while tracing so identities stay unique.
    * An Inf that enters from a constant (a ``-inf`` mask) is legitimate: the producer is then
      the op that turned it into NaN.
    * Framework-free decisions: evidence goes to ``nanscope.core.rules.classify_producer``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context as _context
from tensorflow.python.eager import execute as _execute
from tensorflow.python.framework import op_callbacks

from nanscope.core.diagnosis import Diagnosis, Location, samples_text
from nanscope.core.enums import OpKind, Phase
from nanscope.core.limits import limits
from nanscope.core.origin import OpSeen, OriginKind, OriginTracker, Value
from nanscope.core.rules import ProducerEvidence, diagnose_failure
from nanscope.core.source import _display, is_user_file
from nanscope.core.summary import batch_rows, fmt, summarize

EXTERNAL = -1  # a non-finite value that came from outside any traced op (batch, constant)
_SINGULAR = {
    OpKind.SQRT,
    OpKind.RSQRT,
    OpKind.POW,
    OpKind.LOG,
    OpKind.DIV,
    OpKind.ACOS,
    OpKind.ASIN,
}


def to_numpy(t: Any) -> np.ndarray | None:
    """A float view of a tensor (bfloat16 through float32), or None for non-numeric ones."""
    try:
        dtype = t.dtype
        if not (dtype.is_floating or dtype.is_complex or dtype.is_integer or dtype.is_bool):
            return None
        if dtype == tf.bfloat16:
            t = tf.cast(t, tf.float32)
        return np.asarray(t.numpy())
    except Exception:  # resources, variants, strings
        return None


def is_float(t: Any) -> bool:
    dtype = getattr(t, "dtype", None)
    return bool(dtype is not None and getattr(dtype, "is_floating", False))


def all_finite(t: Any) -> bool:
    """True when every float tensor in ``t`` (a tensor or a nested structure: multi-output
    models) holds only finite values."""
    if isinstance(t, list | tuple | dict):
        return all(all_finite(u) for u in tf.nest.flatten(t))
    a = to_numpy(t) if is_float(t) else None
    return True if a is None else bool(np.isfinite(a).all())


def _value(t: Any) -> Value:
    """The origin tracker's view of one float tensor."""
    a = to_numpy(t)
    if a is None or np.isfinite(a).all():
        return Value(id(t), True)
    return Value(id(t), False, probe=lambda: (bool(np.isnan(a).any()), bool((a == np.inf).any())))


@dataclass
class OpRecord:
    """One executed op as the tracer saw it."""

    index: int
    op: str
    phase: Phase
    layer: str | None
    layer_path: str | None
    inputs: list[Any]
    outputs: list[Any]
    attrs: tuple
    location: Location | None = None


@dataclass
class Trace:
    """The producers found in one traced step, in execution order."""

    ops: list[OpRecord] = field(default_factory=list)
    producers: list[OpRecord] = field(
        default_factory=list
    )  # ops that made the first NaN/Inf of a value
    origins: OriginTracker = field(default_factory=OriginTracker)
    keep: list[Any] = field(default_factory=list)  # keeps traced tensors alive (unique ids)
    by_tensor: dict[int, list[OpRecord]] = field(default_factory=dict)  # id(forward tensor) -> ops

    def producer_index(self, t: Any) -> int | None:
        """Index in ``producers`` of the op whose values reached ``t``; EXTERNAL for a bad value
        from outside (or a legitimate infinity); None when nothing non-finite reached it."""
        o = self.origins.origin_of(id(t))
        if o is None:
            return EXTERNAL if is_float(t) and not all_finite(t) else None
        if o.kind is OriginKind.PRODUCER:
            return self.producers.index(o.op.record)
        return EXTERNAL

    def origin_of(self, tensors: Any) -> int | None:
        """Producer index whose values reached one of ``tensors`` (EXTERNAL, or None: finite)."""
        found = None
        for t in tf.nest.flatten(tensors):
            o = self.producer_index(t)
            if o is not None and o != EXTERNAL:
                return o
            found = found if o is None else EXTERNAL
        return found


class Tracer:
    """Context manager: trace every eager op executed inside it.

    Example:
        >>> import tensorflow as tf
        >>> with Tracer() as tr:
        ...     y = tf.math.log(tf.constant([1.0, 0.0]))
        >>> tr.trace.producers[0].op
        'Log'
    """

    def __init__(self, *, entry: FrameType | None = None) -> None:
        self.trace = Trace()
        self.phase = Phase.FORWARD
        self.entry = entry
        self._busy = False
        self._user_files: dict[str, bool] = {}

    # -- context ---------------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        op_callbacks.add_op_callback(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        op_callbacks.remove_op_callback(self._callback)

    def mark_external(self, tensors: Any) -> None:
        """Tensors that enter the step from outside (the batch): non-finite ones are EXTERNAL."""
        for t in tf.nest.flatten(tensors):
            if is_float(t) and not all_finite(t):
                op = OpSeen(-1, "batch", Phase.DATA, [], [])
                self.trace.origins.mark_external(_value(t), op)
                self.trace.keep.append(t)

    # -- the callback ----------------------------------------------------------------------
    def _callback(self, op_type, inputs, attrs, outputs, op_name=None, graph=None):
        if graph is not None or self._busy:  # graph construction, or our own numpy work
            return None
        self._busy = True
        try:
            self._see(op_type, list(inputs or ()), attrs, list(outputs or ()))
        except Exception:  # the tracer must never break the step it watches
            pass
        finally:
            self._busy = False
        return None

    def _see(
        self, op_type: str, inputs: list, attrs: tuple, outputs: list, recorded: tuple | None = None
    ) -> None:
        """Follow one op; ``recorded`` = (layer, path, location) when replaying a ``Recorder``."""
        tr = self.trace
        if isinstance(op_type, bytes):
            op_type = op_type.decode()
        if recorded is None:
            layer, path, user_code = _current_layer()
        else:
            layer, path, location = recorded
            user_code = False
        rec = OpRecord(len(tr.ops), op_type, self.phase, layer, path, inputs, outputs, attrs or ())
        if recorded is not None:
            rec.location = location
        tr.ops.append(rec)
        if self.phase is not Phase.BACKWARD:
            if user_code:  # the user's own layer or loss: a source line worth naming
                rec.location = self._location()
            for t in (*inputs, *outputs):
                tr.by_tensor.setdefault(id(t), []).append(rec)
            tr.keep.append(rec)
        outs = [_value(t) for t in outputs if is_float(t)]
        if all(v.finite for v in outs):
            tr.origins.see(OpSeen(rec.index, op_type, self.phase, [], outs))
            return
        tr.keep.append(rec)
        ins = [_value(t) if is_float(t) else Value(id(t), True) for t in inputs]
        op = OpSeen(
            rec.index,
            op_type,
            self.phase,
            ins,
            outs,
            # a variable read or a constant: stored state, not computed here
            source=not any(is_float(t) for t in inputs),
            record=rec,
        )
        if tr.origins.see(op) is not None:  # a new producer
            if recorded is None:
                rec.location = rec.location or self._location()
            tr.producers.append(rec)

    def _location(self) -> Location | None:
        return _user_location(sys._getframe(3), self._user_files, stop=self.entry)


class Recorder:
    """Records the eager ops of one step without looking at their values, so that a failure
    found afterwards (non-finite gradients reaching the optimizer in a custom loop) can be
    explained by replaying the records through a ``Tracer``.

    Used by ``nanscope run`` between ``GradientTape.__enter__`` and ``tape.gradient``: per op
    it costs a tuple and a look at Keras' name-scope stack; the numeric work happens only on
    failure. Phases: ops inside a layer are ``forward``, ops outside any layer after the first
    layer ran are ``loss``, ops during ``tape.gradient`` are ``backward``.

    Example:
        >>> import tensorflow as tf
        >>> rec = Recorder(); rec.start()
        >>> y = tf.math.log(tf.constant([1.0, 0.0])); rec.stop()
        >>> rec.replay().producers[0].op
        'Log'
    """

    def __init__(self) -> None:
        self.records: list[tuple] = []
        self.phase = Phase.FORWARD
        self.active = False
        self._seen_layer = False
        self._user_files: dict[str, bool] = {}

    def start(self) -> None:
        self.records, self.phase, self._seen_layer = [], Phase.FORWARD, False
        if not self.active:
            op_callbacks.add_op_callback(self._callback)
            self.active = True

    def stop(self) -> None:
        if self.active:
            op_callbacks.remove_op_callback(self._callback)
            self.active = False

    def _callback(self, op_type, inputs, attrs, outputs, op_name=None, graph=None):
        if graph is not None:
            return None
        try:
            layer, path, user = _current_layer()
            phase = self.phase
            if layer is not None:
                self._seen_layer = True
            elif phase is Phase.FORWARD and self._seen_layer:
                phase = Phase.LOSS
            location = self._location() if user else None
            self.records.append(
                (
                    op_type,
                    list(inputs or ()),
                    attrs,
                    list(outputs or ()),
                    layer,
                    path,
                    location,
                    phase,
                )
            )
        except Exception:  # never break the step being recorded
            pass
        return None

    def _location(self) -> Location | None:
        return _user_location(sys._getframe(2), self._user_files)

    def replay(self, *, external: Any = None) -> Trace:
        tracer = Tracer()
        if external is not None:
            tracer.mark_external(external)
        for op_type, inputs, attrs, outputs, layer, path, location, phase in self.records:
            tracer.phase = phase
            tracer._see(op_type, inputs, attrs, outputs, recorded=(layer, path, location))
        return tracer.trace


def _user_location(
    f: FrameType | None, cache: dict[str, bool], *, stop: FrameType | None = None
) -> Location | None:
    """The innermost frame of user code from ``f`` outwards (up to ``stop``); ``cache``
    remembers which files are the user's."""
    while f is not None and f is not stop:
        name = f.f_code.co_filename
        user = cache.get(name)
        if user is None:
            user = cache[name] = is_user_file(name)
        if user:
            return Location(_display(name, None), f.f_lineno, f.f_code.co_name)
        f = f.f_back
    return None


def first_bad_layer(tr: Trace) -> OpRecord | None:
    """The last op of the first layer call whose output (its last op) is non-finite.

    Where the NaN comes from stored state (a moving statistic read) there is no producer op;
    a person would then look for the first layer whose *output* is bad, as this does.
    """
    run: list[OpRecord] = []
    for rec in [*tr.ops, None]:
        if run and (rec is None or rec.layer_path != run[-1].layer_path):
            last = run[-1]
            if last.layer and any(not all_finite(t) for t in last.outputs):
                return last
            run = []
        if rec is not None and rec.phase is not Phase.BACKWARD:
            run.append(rec)
    return None


def _current_layer() -> tuple[str | None, str | None, bool]:
    """(innermost layer name, layer path, whether the code running is the user's own)."""
    try:
        from keras.src.backend.common import global_state

        stack = global_state.get_global_attribute("name_scope_stack") or []
    except Exception:
        return None, None, False
    layers = [
        e.caller
        for e in stack
        if getattr(e, "caller", None) is not None and hasattr(e.caller, "weights")
    ]
    if not layers:
        return None, None, True
    user = not type(layers[-1]).__module__.startswith(("keras", "tf_keras", "tensorflow"))
    return layers[-1].name, "/".join(la.name for la in layers), user


# -- evidence --------------------------------------------------------------------------------


def producer_evidence(
    tr: Trace,
    rec: OpRecord,
    *,
    batch_size: int | None,
    step: int | None = None,
    valid_targets: int | None = None,
    ignore_index: int | None = None,
) -> ProducerEvidence:
    """Summaries of the producer's inputs and output, its samples, and (backward) its forward op."""
    ins = [
        summarize(a, t.dtype.name)
        for t in rec.inputs
        if is_float(t) and (a := to_numpy(t)) is not None
    ]
    outs = [(t, to_numpy(t)) for t in rec.outputs if is_float(t)]
    bad = [(t, a) for t, a in outs if a is not None and not np.isfinite(a).all()]
    t_out, a_out = bad[0] if bad else outs[0]
    samples, positions = batch_rows(a_out, batch_size) if batch_size else ([], [])
    extra: list[str] = []
    if positions:
        extra.append(f"positions within each sample (tokens, heads): {samples_text(positions)}")
    forward_op, forward_inputs, layer, location = None, [], rec.layer, rec.location
    if rec.phase is Phase.BACKWARD:
        fwd = forward_op_of(tr, rec)
        if fwd is not None:
            forward_op, layer, location = fwd.op, fwd.layer or layer, fwd.location or location
            forward_inputs = [
                summarize(a, t.dtype.name)
                for t in fwd.inputs
                if is_float(t) and (a := to_numpy(t)) is not None
            ]
            extra.append(
                f"forward op {fwd.op}"
                + (f" in layer {fwd.layer}" if fwd.layer else "")
                + ": input "
                + "; ".join(s.describe() for s in forward_inputs)
            )
            discarded = [t for t in fwd.outputs if is_float(t) and not all_finite(t)]
            if discarded:
                extra.append(
                    f"{fwd.op}'s own output was non-finite ({summarize(to_numpy(discarded[0])).describe()}) "
                    "but never reached the loss: a where/select discarded it, and its gradient still "
                    "flows (the where trap)"
                )
            if not samples and batch_size:
                for t in fwd.inputs:
                    a = to_numpy(t) if is_float(t) else None
                    if a is not None and a.ndim and a.shape[0] == batch_size:
                        samples = [
                            int(i)
                            for i in np.flatnonzero((a == 0).reshape(batch_size, -1).any(axis=1))
                        ]
                        break
        elif rec.op.endswith("Grad"):
            forward_op = rec.op[: -len("Grad")]
    out_summary = summarize(a_out, t_out.dtype.name)
    if out_summary.dtype in ("float16", "bfloat16") and (out_summary.posinf or out_summary.neginf):
        wide = _rerun_in_float32(rec)
        if wide is not None and np.isfinite(
            wide
        ):  # finite in float32: float16's range was the problem
            extra.append(
                f"max |activation| of {rec.op}"
                + (f" in {layer}" if layer else "")
                + f" computed in float32: {wide:.4g}, above the {out_summary.dtype} limit "
                f"{fmt(limits(out_summary.dtype).max)}"
                if out_summary.dtype == "float16"
                else f"max |activation| in float32: {wide:.4g}"
            )
    details = {"layer_path": rec.layer_path} if rec.layer_path else {}
    if (
        OpKind.of(rec.op) is OpKind.LOG
        and rec.inputs
        and (maker := _maker(tr, rec.inputs[0], rec)) is not None
    ):
        details["input_op"] = str(OpKind.of(maker.op))
    if OpKind.of(rec.op) is OpKind.EXP:  # how its output is used: normalized (a softmax) or a scale
        readers = {
            r
            for o in rec.outputs
            for r in tr.by_tensor.get(id(o), [])
            if r.index > rec.index and any(t is o for t in r.inputs)
        }
        details["used_by"] = sorted({str(OpKind.of(r.op)) for r in readers})
    return ProducerEvidence(
        op=rec.op,
        phase=rec.phase,
        inputs=ins,
        output=out_summary,
        framework="keras",
        op_kind=OpKind.of(forward_op)
        if rec.phase is Phase.BACKWARD and forward_op and OpKind.of(rec.op) is OpKind.OTHER
        else None,
        module=layer,
        location=location,
        samples=samples,
        step=step,
        forward_op=forward_op,
        forward_inputs=forward_inputs,
        valid_targets=valid_targets,
        ignore_index=ignore_index,
        extra_evidence=extra,
        details=details,
    )


# Ops that pick or move values without computing new ones: looked through to the op before.
_SELECTS = {
    "GatherV2",
    "GatherNd",
    "Reshape",
    "Squeeze",
    "ExpandDims",
    "StridedSlice",
    "Identity",
    "Transpose",
    "ConcatV2",
    "Pack",
    "Slice",
}


def _maker(tr: Trace, t: Any, reader: OpRecord, depth: int = 0) -> OpRecord | None:
    """The forward op that made ``t`` (read by ``reader``), looking through selections."""
    rec = next(
        (
            r
            for r in reversed(tr.by_tensor.get(id(t), []))
            if r is not reader and any(o is t for o in r.outputs)
        ),
        None,
    )
    if rec is not None and rec.op in _SELECTS and rec.inputs and depth < 8:
        return _maker(tr, rec.inputs[0], rec, depth + 1) or rec
    return rec


def forward_op_of(tr: Trace, rec: OpRecord) -> OpRecord | None:
    """The forward op whose derivative a backward op computes (shares a tensor with it)."""
    cands = [r for t in rec.inputs for r in tr.by_tensor.get(id(t), [])]
    if not cands:
        return None
    for c in cands:
        if OpKind.of(c.op) in _SINGULAR:
            return c
    return cands[0]


def _rerun_in_float32(rec: OpRecord) -> float | None:
    """Re-execute a reduced-precision op in float32: how large the activation really was."""
    try:
        attrs = list(rec.attrs)
        for i in range(1, len(attrs), 2):
            if attrs[i] in (tf.float16.as_datatype_enum, tf.bfloat16.as_datatype_enum):
                attrs[i] = tf.float32.as_datatype_enum
        ins = [tf.cast(t, tf.float32) if is_float(t) else t for t in rec.inputs]
        outs = _execute.execute(rec.op, len(rec.outputs), ins, tuple(attrs), _context.context())
        return float(np.max(np.abs(outs[0].numpy())))
    except Exception:
        return None


def diagnosis_from_trace(
    tr: Trace,
    failed: Any,
    *,
    batch_size: int | None,
    step: int | None = None,
    valid_targets: int | None = None,
    ignore_index: int | None = None,
    gradients_only: bool = False,
) -> Diagnosis | None:
    """Classify the producer whose values reached ``failed`` (first producer as a fallback).

    ``gradients_only``: the loss and the output were finite and only gradients were not. A
    forward producer found then had its NaN discarded (``tf.where``) in the forward pass and
    brought back by the gradient: the where trap, a singular gradient.
    """
    if not tr.producers:
        return None
    idx = tr.origin_of(failed) if failed is not None else None
    prod = tr.producers[idx] if idx is not None and idx >= 0 else tr.producers[0]
    ev = producer_evidence(
        tr,
        prod,
        batch_size=batch_size,
        step=step,
        valid_targets=valid_targets,
        ignore_index=ignore_index,
    )
    return diagnose_failure(ev, reached="gradient" if gradients_only else "loss")
