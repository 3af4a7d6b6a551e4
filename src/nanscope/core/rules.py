"""The rules that turn collected evidence into one root cause.

Pure functions over plain data (``TensorSummary``, names, numbers): the live guards, the
tracers and the offline audits of every framework collect evidence and call these, so they
can never disagree. Nothing here imports a framework.

Entry points:
    classify_producer(ProducerEvidence)  the first op that produced NaN/Inf -> Diagnosis
    nonfinite_input(...), nonfinite_parameters(...), corrupt_norm_statistics(...),
    optimizer_state(...), exploding_gradients(...)  state- and data-level diagnoses
    loss_scale_collapse(...)  a dynamic loss scale (GradScaler, LossScaleOptimizer) that collapsed
    norm_statistics_problems(...)  what is wrong with one normalization layer's statistics
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nanscope.core.diagnosis import (
    Diagnosis,
    Location,
    compose_summary,
    samples_phrase,
    samples_text,
    where_phrase,
)
from nanscope.core.enums import Category, OpKind, Phase
from nanscope.core.fixes import fixes_for, loss_scale_fixes
from nanscope.core.limits import limits
from nanscope.core.summary import TensorSummary, fmt

_NAMES = {"torch": "torch", "keras": "keras", "tensorflow": "keras", "tf": "keras"}


@dataclass
class ProducerEvidence:
    """What a tracer saw at the first op whose output was non-finite.

    ``inputs`` are the op's tensor arguments in call order (``None`` for non-tensor ones is
    not needed: pass only tensors). For a backward producer, ``phase`` is BACKWARD and
    ``forward_op`` names the forward op whose derivative failed; ``forward_inputs`` are that
    op's inputs.
    """

    op: str
    phase: Phase
    inputs: list[TensorSummary]
    output: TensorSummary
    framework: str = "torch"
    op_kind: OpKind | None = None
    module: str | None = None
    location: Location | None = None
    samples: list[int] = field(default_factory=list)
    step: int | None = None
    forward_op: str | None = None
    forward_inputs: list[TensorSummary] = field(default_factory=list)
    # Loss context, when the tracer knows it:
    valid_targets: int | None = None  # targets not equal to ignore_index
    target: TensorSummary | None = None
    num_classes: int | None = None
    ignore_index: int | None = None
    # Softmax context: rows (samples) whose every entry is -inf
    all_masked_rows: list[int] = field(default_factory=list)
    extra_evidence: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.op_kind is None:
            self.op_kind = OpKind.of(self.op)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _names(names: list[str], most: int = 3) -> str:
    """``a, b, c …``: the first few names, and a mark when there are more."""
    return ", ".join(names[:most]) + (" …" if len(names) > most else "")


def classify_producer(ev: ProducerEvidence) -> Diagnosis:
    """Decide the root cause at the producer op.

    >>> from nanscope.core.summary import summarize
    >>> import numpy as np
    >>> x = summarize(np.array([0.5, 0.0, 0.2], dtype=np.float32))
    >>> y = summarize(np.array([-0.69, -np.inf, -1.6], dtype=np.float32))
    >>> d = classify_producer(ProducerEvidence("aten::log", Phase.LOSS, [x], y))
    >>> d.category, d.op_kind, d.evidence[0]
    (<Category.OP_DOMAIN: 'op_domain'>, <OpKind.LOG: 'log'>, 'log input: float32[3]: min 0, max 0.5, 1 zero')
    """
    k = OpKind(ev.op_kind)
    fw = _NAMES.get(ev.framework, ev.framework)
    evidence = [
        f"{k} input: {s.describe()}" if len(ev.inputs) == 1 else f"{k} input {i}: {s.describe()}"
        for i, s in enumerate(ev.inputs)
    ]
    evidence.append(f"{k} output: {ev.output.describe()}")
    category, cause = _decide(ev, k, evidence)
    summary = compose_summary(cause, ev.samples, ev.module, ev.location)
    evidence += ev.extra_evidence
    fixes = fixes_for(
        category,
        op_kind=k,
        framework=fw,
        location=ev.location,
        module=ev.module,
        dtype=ev.output.dtype,
        forward_op_kind=OpKind.of(ev.forward_op) if ev.forward_op else None,
        input_op_kind=ev.details.get("input_op"),
        used_by=ev.details.get("used_by"),
    )
    return Diagnosis(
        category=category,
        summary=summary,
        phase=ev.phase,
        op=ev.op,
        op_kind=k,
        module=ev.module,
        location=ev.location,
        dtype=ev.output.dtype,
        samples=list(ev.samples),
        step=ev.step,
        evidence=evidence,
        fixes=fixes,
        framework=fw,
        details=dict(ev.details),
    )


def where_trap(fwd: ProducerEvidence, backward_op: str | None = None) -> ProducerEvidence:
    """A forward producer whose NaN/Inf never reached the loss (``where`` or a mask discarded
    it) but poisoned a gradient: the backward of the discarded branch multiplied a zero
    gradient by it (0 * NaN = NaN). Re-read as a backward producer, ``singular_gradient``."""
    ev = ProducerEvidence(
        op=backward_op or fwd.op,
        phase=Phase.BACKWARD,
        inputs=fwd.inputs,
        output=fwd.output,
        framework=fwd.framework,
        op_kind=fwd.op_kind,
        module=fwd.module,
        location=fwd.location,
        samples=fwd.samples,
        step=fwd.step,
        forward_op=fwd.op,
        forward_inputs=fwd.inputs,
        extra_evidence=list(fwd.extra_evidence),
        details={**fwd.details, "where_trap": True, "forward_producer": fwd.op},
    )
    ev.extra_evidence.append(
        f"forward {fwd.op} made NaN/Inf that `where` (or a mask) discarded, so the loss stayed finite; "
        f"its backward{' (' + backward_op + ')' if backward_op else ''} multiplied the zero gradient by it: "
        "0 * NaN = NaN"
    )
    return ev


def diagnose_failure(
    evidence: ProducerEvidence, *, reached: str, backward_op: str | None = None
) -> Diagnosis:
    """The diagnosis of the producer whose values reached ``reached`` (``loss``, ``output``,
    ``gradient``): a forward producer reached only through a gradient is the where trap."""
    if reached == "gradient" and evidence.phase is not Phase.BACKWARD:
        evidence = where_trap(evidence, backward_op)
    d = classify_producer(evidence)
    d.details.setdefault("reached", reached)
    return d


def unexplained(
    what: str,
    *,
    framework: str = "torch",
    step: int | None = None,
    why: str | None = None,
    evidence: list[str] | None = None,
    phase: Phase | None = None,
    samples: list[int] | None = None,
) -> Diagnosis:
    """A non-finite ``what`` (loss, gradient, output) that no watched op produced."""
    fw = _NAMES.get(framework, framework)
    return Diagnosis(
        Category.UNKNOWN,
        f"the {what} is non-finite but no watched op produced it",
        framework=fw,
        step=step,
        phase=phase,
        samples=list(samples or []),
        evidence=[
            why
            or f"no op nanscope watched made the {what} non-finite: it was written by code nanscope "
            "does not see (a custom C++/CUDA extension, a hook, another thread), or before the step began",
            *(evidence or []),
        ],
        fixes=fixes_for(Category.UNKNOWN, framework=fw),
    )


def _decide(ev: ProducerEvidence, k: OpKind, evidence: list[str]) -> tuple[Category, str]:
    ins, out = ev.inputs, ev.output
    lim = limits(out.dtype)
    made = "NaN" if out.nan else ("+Inf" if out.posinf else "-Inf")

    # Backward: forward was finite, the derivative was not.
    if ev.phase is Phase.BACKWARD:
        fk = OpKind.of(ev.forward_op) if ev.forward_op else k
        at_zero = [s for s in ev.forward_inputs if s.zeros]
        name = ev.forward_op or ev.op
        if ev.details.get("where_trap"):  # checked first: the forward op itself may be sqrt/log
            evidence.insert(
                0, "the NaN comes from the branch `where` discarded in the forward pass"
            )
            return (
                Category.SINGULAR_GRADIENT,
                f"the gradient through where is {made}: {fk} was NaN/Inf in the discarded branch (the where trap)",
            )
        if at_zero or fk in (
            OpKind.SQRT,
            OpKind.RSQRT,
            OpKind.POW,
            OpKind.LOG,
            OpKind.DIV,
            OpKind.ACOS,
            OpKind.ASIN,
        ):
            zeros = sum(s.zeros for s in at_zero)
            evidence.insert(
                0,
                f"forward {name} was finite; its derivative is not"
                + (f" at {_plural(zeros, 'input')} == 0" if zeros else ""),
            )
            return Category.SINGULAR_GRADIENT, f"the gradient of {fk} is {made} at its input" + (
                " 0" if zeros else ""
            )
        if "where" in (ev.forward_op or "").lower():
            evidence.insert(
                0, "the NaN comes from the branch `where` discarded in the forward pass"
            )
            return (
                Category.SINGULAR_GRADIENT,
                f"the gradient through where is {made} (the where trap)",
            )
        if lim and out.posinf + out.neginf and not out.nan:
            return Category.OVERFLOW, f"gradient of {fk} overflowed {out.dtype}"
        return (
            Category.SINGULAR_GRADIENT,
            f"the gradient of {fk} became {made} while its forward was finite",
        )

    bad_in = [s for s in ins if not s.finite]
    # Softmax over rows that are all -inf: every key masked.
    if k in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX) and (ev.all_masked_rows or (bad_in and out.nan)):
        rows = ev.all_masked_rows
        evidence.insert(
            0, f"{_plural(len(rows), 'row')} entirely -Inf" if rows else "rows with no finite entry"
        )
        return Category.ALL_MASKED_SOFTMAX, f"{k} over a row where every position is masked (-Inf)"
    if bad_in:
        kinds = sorted({("Inf" if s.posinf or s.neginf else "NaN") for s in bad_in})
        if k in (OpKind.ADD, OpKind.SUB, OpKind.SUM, OpKind.MEAN):
            return Category.OP_DOMAIN, f"{k} of opposite infinities (inf - inf) made NaN"
        if k in (OpKind.MUL, OpKind.MATMUL, OpKind.CONV):
            return Category.OP_DOMAIN, f"{k} of 0 and Inf (0 * inf) made NaN"
        return Category.OP_DOMAIN, f"{k} turned {' and '.join(kinds)} inputs into {made}"

    # Loss context: nothing valid to average over, or labels out of range.
    if ev.valid_targets == 0:
        evidence.insert(
            0,
            "0 valid targets: every target equals ignore_index"
            + (f" {ev.ignore_index}" if ev.ignore_index is not None else ""),
        )
        return Category.INVALID_TARGET, f"the loss averaged over 0 valid targets (0/0) in {k}"
    if ev.target is not None and ev.num_classes is not None and ev.target.max is not None:
        if ev.target.max >= ev.num_classes or (
            ev.target.min is not None and ev.target.min < 0 and ev.target.min != ev.ignore_index
        ):
            evidence.insert(
                0,
                f"targets range {fmt(ev.target.min)}..{fmt(ev.target.max)} but there are {ev.num_classes} classes",
            )
            return Category.INVALID_TARGET, f"targets outside [0, {ev.num_classes})"
    if k is OpKind.CTC_LOSS:
        evidence.insert(
            0,
            "CTC returns +Inf when no alignment of the target fits the input (target longer than input, or too many "
            "repeats)",
        )
        return (
            Category.INVALID_TARGET,
            "CTC loss got a target that cannot be aligned with its input",
        )

    x = ins[0] if ins else None
    if k is OpKind.LOG and x is not None and (x.zeros or x.negatives):
        what = [
            f"{_plural(x.zeros, 'zero')}" if x.zeros else "",
            f"{x.negatives} negative" if x.negatives else "",
        ]
        return (
            Category.OP_DOMAIN,
            f"log received {' and '.join(w for w in what if w)}, min {fmt(x.min)}",
        )
    if k is OpKind.SQRT and x is not None and x.negatives:
        return (
            Category.OP_DOMAIN,
            f"sqrt received {x.negatives} negative value{'s' if x.negatives > 1 else ''}, min {fmt(x.min)}",
        )
    if k is OpKind.RSQRT and x is not None and (x.zeros or x.negatives):
        return (
            Category.OP_DOMAIN,
            f"rsqrt received {x.zeros} zeros and {x.negatives} negative values",
        )
    if k is OpKind.DIV:
        den = ins[1] if len(ins) > 1 else None
        if den is not None and den.zeros:
            num = ins[0]
            kind = "0/0" if num.zeros and out.nan else "x/0"
            return (
                Category.OP_DOMAIN,
                f"division by zero ({kind}): the denominator holds {_plural(den.zeros, 'zero')}",
            )
        if len(ins) == 1 and x is not None and x.zeros:  # reciprocal
            return Category.OP_DOMAIN, f"reciprocal of {_plural(x.zeros, 'zero')}"
    if k is OpKind.POW and x is not None and x.negatives and out.nan:
        return Category.OP_DOMAIN, "pow of a negative base to a fractional exponent"
    if k in (OpKind.ACOS, OpKind.ASIN) and x is not None and x.absmax is not None and x.absmax > 1:
        return Category.OP_DOMAIN, f"{k} received values outside [-1, 1] (max |x| {fmt(x.absmax)})"
    if out.nan and k in (OpKind.VAR, OpKind.STD) and x is not None and not out.posinf + out.neginf:
        # Finite inputs: a variance is NaN only as 0/0, the sample correction over one element.
        n = ev.details.get("reduced_size")
        evidence.insert(
            0,
            f"{k} with the default correction divides by N - 1"
            + (f" = {n} - 1 = {n - 1}" if isinstance(n, int) else " = 0")
            + "; over one element that is 0/0",
        )
        return Category.OP_DOMAIN, f"{k} over one element divides by zero (N - 1 = 0)"
    if k in (OpKind.MEAN, OpKind.CROSS_ENTROPY) and x is not None and x.numel == 0:
        return Category.INVALID_TARGET, f"{k} over an empty set (0/0)"

    # Finite inputs, infinite result: the dtype's range was exceeded.
    if out.posinf or out.neginf:
        if lim:
            biggest = max((s.absmax or 0.0) for s in ins) if ins else 0.0
            evidence.insert(
                0, f"{out.dtype} holds at most {fmt(lim.max)}; largest |input| {fmt(biggest)}"
            )
        return Category.OVERFLOW, f"{k} overflowed {out.dtype}" + (
            f" (max {fmt(lim.max)})" if lim and out.dtype in ("float16", "bfloat16") else ""
        )
    # Finite inputs, NaN result from an accumulation: partial products or sums overflowed to
    # +Inf and -Inf inside the op and cancelled (inf - inf).
    if out.nan and lim and ins and k in (OpKind.MATMUL, OpKind.CONV, OpKind.SUM, OpKind.MEAN):
        sizes = [s.absmax or 0.0 for s in ins]
        reach = (
            sizes[0] * sizes[1]
            if k in (OpKind.MATMUL, OpKind.CONV) and len(sizes) > 1
            else sizes[0] * ins[0].numel
        )
        if reach > lim.max:
            evidence.insert(
                0,
                f"{out.dtype} holds at most {fmt(lim.max)}; largest |inputs| {', '.join(fmt(v) for v in sizes)}: "
                "partial results overflowed to +Inf and -Inf and cancelled (inf - inf)",
            )
            return (
                Category.OVERFLOW,
                f"{k} overflowed {out.dtype} inside its accumulation (inf - inf made NaN)",
            )
    return Category.UNKNOWN, f"{ev.op} produced {made} from finite inputs"


# -- state and data-level diagnoses ---------------------------------------------------------


def nonfinite_input(
    name: str | None,
    summary: TensorSummary,
    samples: list[int],
    *,
    framework: str = "torch",
    step: int | None = None,
    phase: Phase = Phase.DATA,
    category: Category = Category.NONFINITE_INPUT,
    location: Location | None = None,
    read_by: str | None = None,
    read_in: str | None = None,
    read_by_loss: bool = False,
) -> Diagnosis:
    """The batch itself holds NaN/Inf (inputs, or targets with ``category=INVALID_TARGET``).

    A tracer that found the bad tensor only when an op read it passes ``name=None`` with the
    op (``read_by``), its module (``read_in``) and the user's line (``location``). What the
    tensor is, is decided by what consumed it, not by where it sat in the batch: first read by
    the loss (``read_by_loss``) and never by the model, it is a target (soft labels, a
    regression target), ``invalid_target``."""
    if read_by_loss:
        category = Category.INVALID_TARGET
    fw = _NAMES.get(framework, framework)
    what = "input" if category is Category.NONFINITE_INPUT else "target"
    n = summary.nonfinite
    values = f"{n} non-finite value{'s' if n != 1 else ''}{samples_phrase(samples)}"
    # name=None: a tracer saw a tensor that was already bad before any op of the step read it
    # (a dataset tensor, a constant), so it cannot say which argument of the batch it was.
    text = (
        f"the batch's {what} {name!r} holds {values}"
        if name is not None
        else f"{'an' if what == 'input' else 'a'} {what} tensor already held {values} before the first op read it"
    )
    if category is Category.INVALID_TARGET:
        variant: str | None = "nonfinite_values"
    else:  # x["income"]: one input of a dict of them
        variant = "dict_input" if name is not None and '["' in name else None
    fixes = fixes_for(category, framework=fw, variant=variant)
    evidence = [
        f"{name or what + ' tensor'}: {summary.describe()}",
        f"bad samples: {samples_text(samples)}",
    ]
    rows = summary.shape[0] if summary.shape else 0
    if rows > 1 and len(samples) == rows:
        # Every sample bad: a broken transform (x / 0, log of 0, a zero std), not a few bad files.
        text += "; every sample is bad, so suspect the preprocessing"
        evidence.append(f"all {rows} samples hold non-finite values")
        if category is Category.NONFINITE_INPUT:
            fixes = [fixes[1], fixes[0], *fixes[2:]]
    if read_by is not None:
        evidence.append(f"first op to read it: {read_by}" + (f" in {read_in}" if read_in else ""))
    if read_by_loss:
        evidence.insert(
            0,
            "the loss read it and the model never did: it is a target, whatever its place in the batch",
        )
    return Diagnosis(
        category=category,
        phase=phase,
        step=step,
        framework=fw,
        samples=samples,
        dtype=summary.dtype,
        summary=text,
        evidence=evidence,
        fixes=fixes,
        location=location,
    )


def nonfinite_parameters(
    bad: dict[str, TensorSummary],
    *,
    framework: str = "torch",
    step: int | None = None,
    phase: Phase = Phase.STATE,
    kind: str = "weight",
) -> Diagnosis:
    """Weights (or buffers) that were already non-finite before the step."""
    fw = _NAMES.get(framework, framework)
    names = list(bad)
    first = names[0]
    return Diagnosis(
        category=Category.NONFINITE_PARAMETERS,
        phase=phase,
        step=step,
        framework=fw,
        module=first.rsplit(".", 1)[0] if "." in first else None,
        dtype=bad[first].dtype,
        summary=f"{_plural(len(names), kind)} already non-finite before the step: {_names(names)}",
        evidence=[f"{n}: {s.describe()}" for n, s in list(bad.items())[:10]],
        fixes=fixes_for(Category.NONFINITE_PARAMETERS, framework=fw),
        details={"tensors": names},
    )


def norm_statistics_problems(
    mean: TensorSummary | None,
    var: TensorSummary | None,
    *,
    extreme: float = 1e6,
    names: tuple[str, str] = ("running_mean", "running_var"),
) -> list[str]:
    """What is wrong with one normalization layer's running statistics (empty: nothing).

    ``names`` spells the two statistics in the user's framework (Keras:
    ``("moving_mean", "moving_variance")``).

    >>> import numpy as np
    >>> from nanscope.core.summary import summarize
    >>> norm_statistics_problems(summarize(np.zeros(4)), summarize(np.array([1.0, np.nan, -1.0, 2.0])))
    ['running_var: 1 NaN of 4', 'running_var: 1 negative (min -1)']
    """
    out = []
    mean_name, var_name = names
    for label, s in ((mean_name, mean), (var_name, var)):
        if s is None:
            continue
        bad = [(s.nan, "NaN"), (s.posinf, "+Inf"), (s.neginf, "-Inf")]
        if s.nonfinite:
            out.append(f"{label}: " + ", ".join(f"{n} {w}" for n, w in bad if n) + f" of {s.numel}")
        if label == var_name and s.negatives:
            out.append(f"{var_name}: {s.negatives} negative (min {fmt(s.min)})")
        if s.absmax is not None and s.absmax > extreme:
            out.append(f"{label}: extreme values (max |x| {fmt(s.absmax)})")
    return out


def corrupt_norm_statistics(
    layers: dict[str, list[str]],
    *,
    framework: str = "torch",
    phase: Phase = Phase.STATE,
    train_finite: bool | None = None,
    eval_finite: bool | None = None,
    step: int | None = None,
    samples: list[int] | None = None,
) -> Diagnosis:
    """Normalization layers whose running statistics are bad (``layers``: name -> problems)."""
    fw = _NAMES.get(framework, framework)
    names = list(layers)
    ev = [f"{n}: {p}" for n in names for p in layers[n]]
    if train_finite is not None and eval_finite is not None:
        ev.insert(
            0, f"train-mode output finite: {train_finite}; eval-mode output finite: {eval_finite}"
        )
    return Diagnosis(
        category=Category.CORRUPT_NORM_STATISTICS,
        phase=phase,
        framework=fw,
        module=names[0],
        step=step,
        op="batch_norm",
        op_kind=OpKind.BATCH_NORM,
        samples=samples or [],
        summary=f"normalization statistics are corrupt in {_plural(len(names), 'layer')}: {_names(names)}",
        evidence=ev,
        fixes=fixes_for(Category.CORRUPT_NORM_STATISTICS, framework=fw),
        details={"layers": layers},
    )


def optimizer_state(
    bad: dict[str, TensorSummary],
    *,
    framework: str = "torch",
    eps: float | None = None,
    param_dtype: str | None = None,
    step: int | None = None,
    lr: float | None = None,
) -> Diagnosis:
    """The optimizer's own state (moments, step size) went non-finite."""
    fw = _NAMES.get(framework, framework)
    ev = [f"{n}: {s.describe()}" for n, s in list(bad.items())[:10]]
    lim = limits(param_dtype) if param_dtype else None
    vanishes = eps is not None and lim is not None and eps < lim.subnormal / 2
    if eps == 0:
        ev.insert(
            0,
            "eps=0: the update's denominator sqrt(exp_avg_sq) + eps is 0 wherever the "
            "gradient has been exactly 0",
        )
    elif eps is not None and lim is not None:
        ev.insert(
            0,
            f"eps={eps:g} in {param_dtype}: "
            + (
                "rounds to 0 (smallest subnormal is " + fmt(lim.subnormal) + ")"
                if vanishes
                else "representable"
            ),
        )
    if lr is not None:
        ev.append(f"learning rate {lr!r}")
    names = ", ".join(list(bad)[:3]) + (" …" if len(bad) > 3 else "")
    if eps == 0:
        summary = (
            "eps=0, so the optimizer's update divided 0 / 0 where the gradient was exactly 0: "
            + names
        )
    elif vanishes:
        summary = f"eps={eps:g} rounds to 0 in {param_dtype}, so the optimizer's update divided by zero: {names}"
    else:
        summary = f"optimizer state went non-finite: {names}"
    return Diagnosis(
        category=Category.OPTIMIZER_STATE,
        phase=Phase.OPTIMIZER,
        framework=fw,
        dtype=param_dtype,
        step=step,
        summary=summary,
        evidence=ev,
        fixes=fixes_for(
            Category.OPTIMIZER_STATE, framework=fw, variant="eps_zero" if eps == 0 else None
        ),
        details={"eps": eps, "eps_vanishes": bool(vanishes)} if eps is not None else {},
    )


def in_optimizer_step(producer: Diagnosis, state: Diagnosis | None = None) -> Diagnosis:
    """The update made weights non-finite and the replay of ``optimizer.step()`` found the op
    that did it: ``producer``, an optimizer-phase ``classify_producer`` (Adam's ``addcdiv_``
    dividing 0 / 0, a trust ratio over a zero norm). ``state`` is what the optimizer-state check
    found. A setting that makes the division impossible (an eps that is 0 in the parameters'
    dtype, a non-finite learning rate) explains more than the op it broke: that diagnosis,
    with the op, its line and operands; otherwise the op's, with the state it landed in.

    >>> import numpy as np
    >>> from nanscope.core.summary import summarize
    >>> zero, nan = summarize(np.zeros(3, np.float32)), summarize(np.full(3, np.nan, np.float32))
    >>> op = classify_producer(ProducerEvidence("aten::div", Phase.OPTIMIZER, [zero, zero], nan))
    >>> d = in_optimizer_step(op, optimizer_state({"w": nan}, eps=0.0, param_dtype="float32"))
    >>> d.category, d.phase, d.op_kind
    (<Category.OPTIMIZER_STATE: 'optimizer_state'>, <Phase.OPTIMIZER: 'optimizer'>, <OpKind.DIV: 'div'>)
    >>> in_optimizer_step(op, None).category
    <Category.OP_DOMAIN: 'op_domain'>
    """
    producer.phase = Phase.OPTIMIZER
    said = (
        f"{producer.op} inside optimizer.step(){where_phrase(producer.module, producer.location)}"
    )
    if state is not None and (
        state.details.get("eps_vanishes") or state.summary.startswith("the learning rate")
    ):
        state.op, state.op_kind = producer.op, producer.op_kind
        state.module, state.location = producer.module, producer.location
        state.summary = f"{state.summary}; the first NaN/Inf: {said}"
        state.evidence += producer.evidence
        state.details.update(producer.details)
        return state
    if state is not None:
        producer.evidence.append(
            "non-finite after the update: " + "; ".join(e.split(":")[0] for e in state.evidence)
        )
    return producer


def exploding_gradients(
    norms: list[float],
    *,
    framework: str = "torch",
    step: int | None = None,
    lr: float | None = None,
    phase: Phase = Phase.BACKWARD,
) -> Diagnosis:
    """Gradient norms grew over steps until they overflowed."""
    from nanscope.core.trend import growth_rate

    fw = _NAMES.get(framework, framework)
    tail = [n for n in norms if n == n][-8:]
    rate = growth_rate(norms)
    ev = ["gradient norm history (oldest first): " + ", ".join(fmt(n) for n in tail)]
    if rate is not None:
        ev.append(f"growth: x{rate:.3g} per step over the last {min(len(norms), 8)} steps")
    if lr is not None:
        ev.append(f"learning rate {lr:g}")
    return Diagnosis(
        category=Category.EXPLODING_GRADIENTS,
        phase=phase,
        framework=fw,
        step=step,
        summary="gradients grew over several steps until they overflowed"
        + (f" (learning rate {lr:g})" if lr is not None else ""),
        evidence=ev,
        fixes=fixes_for(Category.EXPLODING_GRADIENTS, framework=fw),
        details={"grad_norms": [float(n) for n in norms[-32:]]},
    )


def loss_scale_collapse(
    scales: list[float],
    skipped_steps: list[int],
    *,
    bad_parameters: list[str] | None = None,
    nonfinite_loss_steps: int = 0,
    framework: str = "torch",
    step: int | None = None,
    dtype: str = "float16",
    min_scale: float = 1.0,
    max_consecutive: int = 10,
) -> Diagnosis | None:
    """A dynamic loss scale that keeps halving: every step is skipped and training stalls.

    ``scales`` is the scale after each optimizer step (oldest first), ``skipped_steps`` the
    steps whose update was not applied. Collapse means the scale fell below ``min_scale`` or
    the last ``max_consecutive`` steps were all skipped; None otherwise.

    >>> d = loss_scale_collapse([8.0, 4.0, 2.0, 1.0, 0.5], [0, 1, 2, 3, 4])
    >>> d.category, d.dtype, "0.5" in d.summary
    (<Category.OVERFLOW: 'overflow'>, 'float16', True)
    >>> loss_scale_collapse([65536.0, 32768.0, 32768.0], [1]) is None
    True
    """
    if not scales:
        return None
    run = 0
    skipped = set(skipped_steps)
    last = step if step is not None else len(scales) - 1
    for s in range(last, -1, -1):
        if s not in skipped:
            break
        run += 1
    if scales[-1] >= min_scale and run < max_consecutive:
        return None
    fw = _NAMES.get(framework, framework)
    bad = list(bad_parameters or [])
    ev = [
        "loss scale history (oldest first): " + ", ".join(fmt(x) for x in scales[-12:]),
        f"{len(skipped)} of {len(scales)} steps skipped; the last {run} in a row",
    ]
    if nonfinite_loss_steps:
        ev.append(
            f"the loss itself was non-finite in {nonfinite_loss_steps} skipped "
            f"step{'s' if nonfinite_loss_steps != 1 else ''}: "
            "the forward pass overflows whatever the scale"
        )
    if bad:
        ev.append(
            f"{len(bad)} parameter{'s' if len(bad) != 1 else ''} with non-finite gradients: "
            f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}"
        )
    why = (
        f"scale {fmt(scales[-1])} < {fmt(min_scale)}"
        if scales[-1] < min_scale
        else f"{run} steps skipped in a row"
    )
    return Diagnosis(
        category=Category.OVERFLOW,
        phase=Phase.FORWARD if nonfinite_loss_steps else Phase.BACKWARD,
        framework=fw,
        dtype=dtype,
        step=step if step is not None else len(scales) - 1,
        module=bad[0].rsplit(".", 1)[0] if bad and "." in bad[0] else None,
        summary=f"the loss scale collapsed ({why}): {dtype} overflows at every scale, so no update is applied",
        evidence=ev,
        fixes=loss_scale_fixes(fw, forward_overflow=bool(nonfinite_loss_steps)),
        details={
            "scales": [float(x) for x in scales[-64:]],
            "skipped_steps": sorted(skipped)[-64:],
            "bad_parameters": bad[:50],
        },
    )


def not_reproduced(
    what: str,
    *,
    framework: str = "torch",
    step: int | None = None,
    compiled: str | None = None,
    phase: Phase | None = None,
    samples: list[int] | None = None,
    evidence: list[str] | None = None,
) -> Diagnosis:
    """The step made ``what`` (the loss, a gradient, the output) non-finite, and the same step
    replayed from the same state and batch stayed finite.

    ``compiled`` names the compiled function (``torch.compile``, XLA) when the failing run was
    compiled and the replay eager: their numerics differ, ``compiled_numerics``. Otherwise
    the failure did not reproduce at all: ``transient``.

    >>> not_reproduced("loss", step=3).category, not_reproduced("loss", compiled="train_step").category
    (<Category.TRANSIENT: 'transient'>, <Category.COMPILED_NUMERICS: 'compiled_numerics'>)
    """
    fw = _NAMES.get(framework, framework)
    ev = list(evidence or [])
    if compiled is not None:
        category = Category.COMPILED_NUMERICS
        summary = (
            f"the compiled step ({compiled}) made the {what} non-finite; the same step run eagerly "
            "from the same state and batch stayed finite"
        )
        ev.insert(0, f"compiled run: {what} non-finite; eager replay: finite")
    else:
        category = Category.TRANSIENT
        summary = (
            f"the {what} was non-finite, but the same step replayed from the same state and batch "
            "stayed finite: the failure did not reproduce"
        )
        ev.insert(0, f"first run: {what} non-finite; replay: finite")
    return Diagnosis(
        category,
        summary,
        phase=phase,
        framework=fw,
        step=step,
        samples=list(samples or []),
        evidence=ev,
        fixes=fixes_for(category, framework=fw),
    )


def not_localized(
    what: str,
    error: BaseException | str,
    *,
    framework: str = "torch",
    step: int | None = None,
    evidence: list[str] | None = None,
) -> Diagnosis:
    """A non-finite ``what`` that nanscope saw but could not trace to its producer, because
    its own replay or tracer failed (``error``): the failure is real, the cause unknown."""
    fw = _NAMES.get(framework, framework)
    why = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return Diagnosis(
        Category.UNKNOWN,
        f"the {what} was non-finite; nanscope could not trace it to the op that produced it",
        framework=fw,
        step=step,
        evidence=[*(evidence or []), f"nanscope's replay of the step failed ({why})"],
        fixes=[
            (
                "trace the failing batch by hand: `nanscope.torch.diagnose(model, batch, loss_fn)`"
                if fw == "torch"
                else "trace the failing batch by hand: `nanscope.keras.diagnose(model, batch, loss)`"
            ),
            *fixes_for(Category.UNKNOWN, framework=fw),
        ],
    )


def written_by_update(
    found: Diagnosis,
    *,
    step: int,
    grad_norms: list[float],
    lr: float | None = None,
    optimizer: Diagnosis | None = None,
) -> Diagnosis:
    """Weights found non-finite at ``step`` that were finite at the step before, whose loss
    and gradients were finite (a guard vetoes the others): the update of ``step - 1`` wrote
    them. ``optimizer`` is what the optimizer-state check found, if anything; otherwise the
    gradient-norm history tells an explosion from a one-off overflow of the update.

    >>> from nanscope.core.summary import summarize
    >>> import numpy as np
    >>> bad = nonfinite_parameters({"fc.weight": summarize(np.array([np.inf], np.float32))}, step=5)
    >>> d = written_by_update(bad, step=5, grad_norms=[1.0, 1.0], lr=0.1)
    >>> d.phase, d.step, d.evidence[-1]
    (<Phase.OPTIMIZER: 'optimizer'>, 4, 'the update of step 4 made them non-finite; step 5 found them')
    """
    d = optimizer or with_history(found, grad_norms, lr=lr)
    d.phase, d.step = Phase.OPTIMIZER, step - 1
    if d is found:
        names = found.details.get("tensors", [])
        if names:
            d.summary = f"an update made weights non-finite: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
        if lr is not None:
            d.evidence.append(
                f"learning rate {lr:g}; last gradient norms: {', '.join(fmt(n) for n in grad_norms[-4:])}"
            )
    elif optimizer is None:  # the norms grew: exploding gradients, with the weights as evidence
        d.evidence += found.evidence
    d.evidence.append(f"the update of step {step - 1} made them non-finite; step {step} found them")
    return d


def update_overflowed(
    bad_parameters: list[str],
    *,
    framework: str = "torch",
    step: int | None = None,
    lr: float | None = None,
    dtype: str | None = None,
) -> Diagnosis:
    """``optimizer.step()`` made weights non-finite from finite gradients and finite state:
    a non-finite learning rate, or an update too large for the weights' dtype."""
    fw = _NAMES.get(framework, framework)
    names = ", ".join(bad_parameters[:3]) + (" …" if len(bad_parameters) > 3 else "")
    ev = [f"learning rate {lr!r}"] if lr is not None else []
    if bad_parameters:
        ev.append(
            f"{len(bad_parameters)} weight{'s' if len(bad_parameters) != 1 else ''} non-finite after the "
            f"update: {names}"
        )
    if lr is not None and not math.isfinite(lr):
        return Diagnosis(
            Category.OPTIMIZER_STATE,
            f"the learning rate is {lr!r}, so the update wrote NaN/Inf weights",
            phase=Phase.OPTIMIZER,
            framework=fw,
            step=step,
            dtype=dtype,
            evidence=ev,
            fixes=fixes_for(Category.OPTIMIZER_STATE, framework=fw),
        )
    return Diagnosis(
        Category.OVERFLOW,
        "the optimizer's update made the weights non-finite from finite gradients and state"
        + (f": {names}" if names else ""),
        phase=Phase.OPTIMIZER,
        framework=fw,
        step=step,
        dtype=dtype,
        module=bad_parameters[0].rsplit(".", 1)[0]
        if bad_parameters and "." in bad_parameters[0]
        else None,
        evidence=ev,
        fixes=fixes_for(Category.EXPLODING_GRADIENTS, framework=fw),
    )


def growth_warning(grad_norms: list[float], *, step: int, framework: str = "torch") -> str | None:
    """An early warning while every gradient is still finite: the norm grows geometrically
    and will overflow if it goes on. None when it does not grow that way.

    >>> growth_warning([1.0, 1.0, 1.1], step=3) is None
    True
    >>> growth_warning([1.0, 4.0, 16.0, 64.0, 256.0], step=5).startswith("nanscope: the gradient norm is growing")
    True
    """
    from nanscope.core.trend import growth_rate, is_exploding

    if not is_exploding(grad_norms):
        return None
    rate = growth_rate(grad_norms)
    fix = fixes_for(Category.EXPLODING_GRADIENTS, framework=_NAMES.get(framework, framework))
    return (
        f"nanscope: the gradient norm is growing fast at step {step} "
        f"({', '.join(fmt(n) for n in grad_norms[-5:])}{f'; x{rate:.3g} per step' if rate else ''}); "
        f"it will overflow if this goes on: {fix[0]}, or {fix[1]}"
    )


def eval_only(
    bad_layers: dict[str, list[str]],
    *,
    train_finite: bool,
    producer: Diagnosis | None = None,
    framework: str = "torch",
    samples: list[int] | None = None,
    first_bad: str | None = None,
    what: str = "output",
    compiled: str | None = None,
) -> Diagnosis:
    """Evaluation / inference made ``what`` non-finite: tell corrupt normalization statistics
    from a producer op. ``bad_layers`` are the normalization layers whose stored statistics are
    bad (``norm_statistics_problems``), ``train_finite`` whether the same batch stayed finite in
    training mode (batch statistics instead of the stored ones), ``producer`` what the per-op
    trace of the inference run found, ``first_bad`` the first op / layer that went non-finite.

    Finite in training mode and bad stored statistics: the statistics are the cause. Otherwise
    the traced producer is; with neither, the statistics if any are bad, else the failure did
    not reproduce under the tracer.

    >>> d = eval_only({"bn": ["running_var: 1 NaN of 4"]}, train_finite=True)
    >>> d.category, d.phase
    (<Category.CORRUPT_NORM_STATISTICS: 'corrupt_norm_statistics'>, <Phase.STATE: 'state'>)
    >>> d.evidence[0]
    'train-mode output finite: True; eval-mode output finite: False'
    """
    fw = _NAMES.get(framework, framework)
    if bad_layers and (train_finite or producer is None):
        d = corrupt_norm_statistics(
            bad_layers,
            framework=fw,
            phase=Phase.STATE,
            train_finite=train_finite,
            eval_finite=False,
            samples=samples,
        )
        if first_bad:
            d.evidence.insert(1, f"first non-finite {what} in inference mode: {first_bad}")
        return d
    if producer is not None:
        producer.evidence.append(
            f"training-mode {what} finite: {train_finite}; inference-mode {what} finite: False"
        )
        return producer
    return not_reproduced(
        what,
        framework=fw,
        phase=Phase.FORWARD,
        samples=samples,
        compiled=compiled,
        evidence=[
            f"inference: {what} non-finite; the traced re-run of the same batch stayed finite "
            "op by op"
        ],
    )


def in_program(
    d: Diagnosis,
    call: str,
    *,
    batch: int | None = None,
    mode: str | None = None,
    after_steps: int | None = None,
) -> Diagnosis:
    """Say where in the program it happened, the same way in every framework: which call
    (``model.predict``, ``evaluation``), which batch of it, in which mode, after how many
    training steps. The summary ends with it; it is the first piece of evidence.

    >>> d = in_program(Diagnosis(Category.OP_DOMAIN, "log received 1 zero"), "evaluation", batch=1,
    ...                mode="eval mode, no_grad", after_steps=2)
    >>> d.summary
    'log received 1 zero; in evaluation, batch 1 (eval mode, no_grad), after 2 training steps'
    """
    where = (
        f"in {call}"
        + (f", batch {batch}" if batch is not None else "")
        + (f" ({mode})" if mode else "")
        + (
            f", after {after_steps} training step{'s' if after_steps != 1 else ''}"
            if after_steps
            else ""
        )
    )
    d.summary = f"{d.summary}; {where}"
    d.evidence.insert(0, where)
    d.details["call"] = {"call": call, "batch": batch, "mode": mode}
    if after_steps is not None:
        d.details["call"]["after_steps"] = after_steps
    return d


# Categories that a growing gradient norm explains better than the op that finally overflowed.
_EXPLOSION_SYMPTOMS = (
    Category.OP_DOMAIN,
    Category.OVERFLOW,
    Category.UNKNOWN,
    Category.SINGULAR_GRADIENT,
    Category.NONFINITE_PARAMETERS,
)


def with_history(
    diagnosis: Diagnosis,
    grad_norms: list[float],
    *,
    lr: float | None = None,
) -> Diagnosis:
    """Tell ``exploding_gradients`` apart from a one-off failure, given the gradient-norm history.

    ``diagnosis`` is what the step itself showed (the producer op, or weights an update made
    non-finite); ``grad_norms`` are the finite norms of the steps before it, oldest first. When
    they grew geometrically (``nanscope.core.trend.is_exploding``) and the step's failure is a
    symptom of growth (an overflow, inf - inf, weights gone non-finite), the root cause is
    ``exploding_gradients`` and the producer becomes evidence; otherwise ``diagnosis`` is
    returned unchanged (bad data, bad targets or a masked softmax are never explained by growth).

    >>> d = Diagnosis(Category.OVERFLOW, "mm overflowed float32", phase="forward", op="aten::mm")
    >>> with_history(d, [1.0, 1.1, 0.9, 1.0]).category
    <Category.OVERFLOW: 'overflow'>
    >>> e = with_history(d, [1.0, 4.0, 16.0, 70.0, 300.0], lr=10.0)
    >>> e.category, e.op
    (<Category.EXPLODING_GRADIENTS: 'exploding_gradients'>, 'aten::mm')
    >>> e.evidence[-1]
    'where it overflowed: overflow in forward: mm overflowed float32'
    """
    from nanscope.core.trend import is_exploding

    if diagnosis.category not in _EXPLOSION_SYMPTOMS or not is_exploding(grad_norms):
        return diagnosis
    d = exploding_gradients(
        list(grad_norms),
        framework=diagnosis.framework or "torch",
        step=diagnosis.step,
        lr=lr,
        phase=diagnosis.phase or Phase.BACKWARD,
    )
    d.op, d.op_kind, d.module, d.location = (
        diagnosis.op,
        diagnosis.op_kind,
        diagnosis.module,
        diagnosis.location,
    )
    d.dtype, d.samples, d.ranks = diagnosis.dtype, list(diagnosis.samples), diagnosis.ranks
    d.evidence.append(
        f"where it overflowed: {diagnosis.category} in {diagnosis.phase}: {diagnosis.summary}"
    )
    d.details["symptom"] = str(diagnosis.category)
    return d
