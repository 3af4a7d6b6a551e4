"""Ranked, concrete fixes for a diagnosis, spelled in the user's framework.

Pure text: given the category, op kind, framework and where it happened, return what to
change, most likely to help first. Adapters never write fix texts of their own.
"""

from __future__ import annotations

from nanscope.core.enums import Category, OpKind

_T, _K = "torch", "keras"


class Fix(tuple):
    """One fix spelled per framework: ``Fix(torch_text, keras_text)``; ``{at}`` is filled
    with the user's line and module, ``{module}`` with the module path."""

    def __new__(cls, torch: str, keras: str | None = None) -> Fix:
        return super().__new__(cls, (torch, torch if keras is None else keras))

    def text(self, framework: str, **fill: str) -> str:
        return self[0 if framework == _T else 1].format(**fill)


_WHERE_TRAP = Fix(
    "the where trap: NaN from the discarded branch of `where` still poisons the gradient; "
    "apply where twice (`safe = where(mask, x, 1.0); where(mask, f(safe), 0.0)`) or use `nanscope.losses.double_where`"
)

# (category, variant) -> fixes, best first. The variant is the producer's op kind, or for
# overflow the dtype ("float16"), for singular gradients the forward op's kind; None is the
# category's default. ``fixes_for`` composes them (see there for the order).
_DROP_BAD_SAMPLES = Fix(
    "drop or repair the bad samples before training: `nanscope data PATH` lists every file/index with NaN/Inf"
)
_CHECK_PREPROCESSING = Fix(
    "check the preprocessing that produced them (division by a zero std, log of 0, a corrupt file)"
)

TABLE: dict[tuple[Category, str | None], tuple[Fix, ...]] = {
    (Category.NONFINITE_INPUT, None): (
        _DROP_BAD_SAMPLES,
        _CHECK_PREPROCESSING,
        Fix(
            "filter inside the loader: `torch.isfinite(x).all()` per sample",
            "filter inside the loader: `dataset.filter(lambda x, y: tf.reduce_all(tf.math.is_finite(x)))`",
        ),
    ),
    # The inputs are a dict of named features (a table's columns): the filter checks each one.
    (Category.NONFINITE_INPUT, "dict_input"): (
        _DROP_BAD_SAMPLES,
        _CHECK_PREPROCESSING,
        Fix(
            "filter inside the loader: `all(torch.isfinite(v).all() for v in x.values())` per sample",
            "filter inside the loader: `dataset.filter(lambda x, y: tf.reduce_all("
            "[tf.reduce_all(tf.math.is_finite(v)) for v in x.values()]))`",
        ),
    ),
    (Category.INVALID_TARGET, OpKind.CTC_LOSS): (
        Fix(
            "every target must fit its input: target length (plus repeats) must be <= input length; "
            "drop or crop the impossible samples"
        ),
        Fix(
            "pass zero_infinity=True to CTCLoss to zero out impossible samples instead of returning Inf",
            "drop impossible samples before `tf.nn.ctc_loss`",
        ),
    ),
    (Category.INVALID_TARGET, None): (
        Fix(
            "skip batches with no valid target, or use a loss that returns 0 then: "
            "`nanscope.losses.cross_entropy(..., ignore_index=...)`"
        ),
        Fix(
            "check the labels: `nanscope data PATH --num-classes N --ignore-index I` reports masks with no valid "
            "pixel and labels out of range"
        ),
        Fix(
            "use reduction='sum' divided by max(1, number of valid targets)",
            "divide the summed loss by max(1, number of valid targets)",
        ),
    ),
    # The target itself holds NaN/Inf (a missing value in the table, a broken label transform),
    # as opposed to a batch with no valid target at all.
    (Category.INVALID_TARGET, "nonfinite_values"): (
        Fix(
            "drop or fill the samples whose target is NaN/Inf before training (a missing value in the "
            "table: `df.dropna(subset=[target_column])`); `nanscope data PATH` lists them in .npy/.npz/.h5 files"
        ),
        Fix(
            "or leave them out of the loss: `keep = torch.isfinite(y); loss = F.mse_loss(pred[keep], y[keep])`",
            "or leave them out of the loss: `keep = tf.math.is_finite(y)`, then the loss of "
            "`tf.boolean_mask(pred, keep)` and `tf.boolean_mask(y, keep)`",
        ),
        Fix("check what made the targets (normalizing by a zero std, a log of 0, a failed parse)"),
    ),
    (Category.OP_DOMAIN, OpKind.LOG): (
        Fix(
            "replace log(softmax(x)) with log_softmax(x) (or F.cross_entropy on the logits){at}",
            "compute the loss from logits: `from_logits=True` (or tf.nn.log_softmax) instead of log(softmax(x)){at}",
        ),
        Fix(
            "clamp the argument: `torch.log(x.clamp_min(1e-7))`",
            "clamp the argument: `tf.math.log(tf.clip_by_value(p, 1e-7, 1.0))`",
        ),
        Fix("or use `nanscope.losses.safe_log`"),
    ),
    # log of something that is not a softmax (a rate, a distance, a probability the user built):
    # the log_softmax rewrite does not apply, the clamp does.
    (Category.OP_DOMAIN, "log_not_of_softmax"): (
        Fix(
            "clamp the argument away from 0{at}: `torch.log(x.clamp_min(1e-7))`",
            "clamp the argument away from 0{at}: `tf.math.log(tf.maximum(x, 1e-7))`",
        ),
        Fix(
            "or use `nanscope.losses.safe_log`; for a rate or a scale, predict its log instead "
            "(an exp or softplus output cannot reach 0)"
        ),
    ),
    (Category.OP_DOMAIN, OpKind.SQRT): (
        Fix(
            "clamp before the root: `torch.sqrt(x.clamp_min(0) + 1e-12)`{at}",
            "clamp before the root: `tf.sqrt(tf.maximum(x, 0.0) + 1e-12)`{at}",
        ),
        Fix("or use `nanscope.losses.safe_sqrt`"),
    ),
    (Category.OP_DOMAIN, OpKind.RSQRT): (
        Fix("add an epsilon: rsqrt(x + eps){at}"),
        Fix("check why the value is <= 0 (a variance of a constant input?)"),
    ),
    (Category.OP_DOMAIN, OpKind.DIV): (
        Fix(
            "guard the denominator: `x / d.clamp_min(eps)`{at}",
            "guard the denominator: `tf.math.divide_no_nan(x, d)`{at}",
        ),
        Fix("or use `nanscope.losses.safe_div`; check for empty masks or zero counts"),
    ),
    (Category.OP_DOMAIN, OpKind.POW): (
        Fix(
            "raise only non-negative bases to fractional powers: `x.clamp_min(0) ** p`{at}",
            "raise only non-negative bases to fractional powers: `tf.pow(tf.maximum(x, 0.0), p)`{at}",
        ),
    ),
    (Category.OP_DOMAIN, OpKind.ACOS): (
        Fix(
            "clamp into the domain: `torch.acos(x.clamp(-1 + 1e-7, 1 - 1e-7))`{at}",
            "clamp into the domain: `tf.acos(tf.clip_by_value(x, -1+1e-7, 1-1e-7))`{at}",
        ),
    ),
    (Category.OP_DOMAIN, OpKind.ASIN): (
        Fix(
            "clamp into the domain: `torch.asin(x.clamp(-1 + 1e-7, 1 - 1e-7))`{at}",
            "clamp into the domain: `tf.asin(tf.clip_by_value(x, -1+1e-7, 1-1e-7))`{at}",
        ),
    ),
    (Category.OP_DOMAIN, OpKind.STD): (
        Fix(
            "a standard deviation over one element divides by N - 1 = 0: pass `correction=0` (`unbiased=False`) "
            "or reduce over more than one element{at}",
            "a standard deviation over one element with ddof=1 divides by N - 1 = 0: use ddof=0 "
            "(`keras.ops.std` is the population one) or reduce over more than one element{at}",
        ),
        Fix(
            "check the batch size: a batch of one sample reaches this (the last, incomplete batch: `drop_last=True`)",
            "check the batch size: a batch of one sample reaches this (the last, incomplete batch: "
            "`dataset.batch(n, drop_remainder=True)`)",
        ),
    ),
    (Category.OP_DOMAIN, None): (
        Fix("an input reached this op outside its domain{at}: clamp it or mask the bad elements"),
        Fix("inf - inf and 0 * inf give NaN: find where the Inf came from first"),
    ),
    (Category.OVERFLOW, OpKind.EXP): (
        Fix(
            "subtract the max before exp (use `torch.softmax`/`torch.logsumexp`, which do){at}",
            "subtract the max before exp (use `tf.nn.softmax`/`tf.reduce_logsumexp`, which do){at}",
        ),
    ),
    # exp of a raw network output (a log-variance, a log-scale): nothing to subtract a max from.
    (Category.OVERFLOW, "exp_of_raw"): (
        Fix(
            "clamp what goes into exp{at}: a log-variance or log-scale the network predicts can grow "
            "without bound, e.g. `std = torch.exp(0.5 * logvar.clamp(-20, 20))`, or use "
            "`F.softplus` for a positive scale",
            "clamp what goes into exp{at}: a log-variance or log-scale the network predicts can grow "
            "without bound, e.g. `std = tf.exp(0.5 * tf.clip_by_value(logvar, -20.0, 20.0))`, or use "
            "`tf.nn.softplus` for a positive scale",
        ),
    ),
    (Category.OVERFLOW, "float16"): (
        Fix(
            "keep this module in float32{at}: wrap its forward in "
            "`with torch.autocast(device_type, enabled=False): y = {module_call}(x.float())`",
            "keep this module in float32{at}: give the layer {layer}`dtype='float32'` under mixed_float16",
        ),
        Fix("train in bfloat16 instead of float16 (same range as float32)"),
        Fix("scale down the branch that grows: normalize before it, or scale residual additions"),
    ),
    (Category.OVERFLOW, None): (
        Fix(
            "the values grew past the dtype's range{at}: normalize the inputs, lower the learning rate, or clip "
            "activations"
        ),
        Fix("check for exploding weights: `nanscope inspect` on the last checkpoint"),
    ),
    (Category.SINGULAR_GRADIENT, OpKind.SQRT): (
        Fix(
            "add an epsilon inside the root: `torch.sqrt(x + 1e-12)`, or `nanscope.losses.safe_sqrt` / `safe_norm` "
            "(finite gradient at 0){at}",
            "add an epsilon inside the root: `tf.sqrt(x + 1e-12)`, or `nanscope.losses.safe_sqrt` / `safe_norm` "
            "(finite gradient at 0){at}",
        ),
        _WHERE_TRAP,
    ),
    (Category.SINGULAR_GRADIENT, OpKind.CROSS_ENTROPY): (
        Fix(
            "compute the loss from logits (`F.binary_cross_entropy_with_logits` / `F.cross_entropy`), or on float32 "
            "probabilities clamped away from 0 and 1: `nanscope.losses.binary_cross_entropy`{at}",
            "compute the loss from logits (`from_logits=True`), or on float32 probabilities clamped away from 0 and 1: "
            "`nanscope.losses.binary_cross_entropy`{at}",
        ),
        _WHERE_TRAP,
    ),
    (Category.SINGULAR_GRADIENT, None): (
        Fix(
            "the derivative is infinite at this input{at}: keep the input away from the singular point"
        ),
        _WHERE_TRAP,
    ),
    (Category.EXPLODING_GRADIENTS, None): (
        Fix("lower the learning rate (10x is a good first try)"),
        Fix(
            "clip gradients: `torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)` before `optimizer.step()`",
            "clip gradients: `optimizer = keras.optimizers.Adam(..., clipnorm=1.0)`",
        ),
        Fix("add a learning-rate warm-up; check the loss scale and weight decay"),
    ),
    (Category.NONFINITE_PARAMETERS, None): (
        Fix(
            "the weights were already bad before this step: load an earlier checkpoint "
            "(`nanscope inspect CHECKPOINT` names every bad tensor)"
        ),
        Fix(
            "find the step that first wrote them: run with `nanscope.torch.Guard(policy='raise')`",
            "find the step that first wrote them: add `nanscope.keras.Guard(policy='raise')` to fit",
        ),
    ),
    (Category.CORRUPT_NORM_STATISTICS, None): (
        Fix(
            "recompute the normalization statistics from data: `nanscope.torch.repair_norm_statistics(model, loader)` "
            "or `nanscope repair CKPT --recalibrate-bn --data PATH -o NEW`",
            "recompute the normalization statistics from data: `nanscope.keras.repair_norm_statistics(model, dataset)`",
        ),
        Fix(
            "find what poisoned them during training (a NaN batch in train mode, float16 variance overflow): "
            "guard training with policy 'skip'"
        ),
        Fix(
            "fallback: reset them (mean 0, var 1) with `nanscope repair CKPT --reset-bn -o NEW`; this loses what the "
            "model learned about activation scale and usually costs accuracy"
        ),
    ),
    (Category.OPTIMIZER_STATE, None): (
        Fix(
            "keep the optimizer state in float32: train float32 master weights (autocast / mixed precision) "
            "instead of float16 parameters"
        ),
        Fix("raise the epsilon to one float16 can hold (eps=1e-4), or use bfloat16"),
        Fix("check the learning rate and scheduler for NaN/Inf values"),
    ),
    (Category.OPTIMIZER_STATE, "eps_zero"): (
        Fix(
            "give the optimizer an eps > 0 (Adam's default is eps=1e-8){at}: with eps=0 its update is "
            "0 / 0 wherever a gradient has been exactly 0 (embedding rows not in the batch, an unused head)"
        ),
        Fix("check the learning rate and scheduler for NaN/Inf values"),
    ),
    (Category.ALL_MASKED_SOFTMAX, None): (
        Fix(
            "a row with every key masked has no valid softmax: give it at least one unmasked position or zero the "
            "row after softmax{at}"
        ),
        Fix(
            "use `nanscope.losses.masked_softmax` (returns zeros for fully masked rows), or mask with a large "
            "negative number (-1e4 in float16) instead of -inf"
        ),
    ),
    (Category.COMPILED_NUMERICS, None): (
        Fix(
            "run the step eagerly to confirm and localize: `torch.compiler.set_stance('force_eager')` "
            "(or `nanscope run` without compiling), then fix the op the eager trace names",
            "run the step eagerly to confirm and localize: `model.compile(..., jit_compile=False)` "
            "or `tf.config.run_functions_eagerly(True)`",
        ),
        Fix(
            "the compiler fused ops or changed their precision: keep the failing region out of the compiled graph "
            "(`torch.compiler.disable` on that module), or compile in float32",
            "the compiler fused ops or changed their precision: turn XLA off for the model (jit_compile=False) "
            "or keep the failing layer in float32",
        ),
    ),
    (Category.TRANSIENT, None): (
        Fix(
            "the same step replayed from the same state and batch stayed finite: suspect non-deterministic kernels "
            "(`torch.use_deterministic_algorithms(True)`), a data race (a buffer written by another thread or "
            "stream), or a faulty device",
            "the same step replayed from the same state and batch stayed finite: suspect non-deterministic kernels "
            "(`tf.config.experimental.enable_op_determinism()`), a data race, or a faulty device",
        ),
        Fix(
            "keep training with policy 'skip' and watch whether it recurs, and on which device or rank"
        ),
    ),
    (Category.UNKNOWN, None): (
        Fix(
            "run `nanscope run` on the script or `diagnose(...)` on the failing batch for a per-op trace"
        ),
    ),
}


_SOFTMAXES = (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX)
# What a hand-written softmax does with exp's output: sum it, divide by the sum.
_NORMALIZERS = {"sum", "mean", "div", "softmax", "log_softmax"}


def _at(location: object | None, module: str | None) -> str:
    where = []
    if location:
        where.append(f"at {location}")
    if module:
        where.append(f"(module {module})")
    return (" " + " ".join(where)) if where else ""


def fixes_for(
    category: Category | str,
    *,
    op_kind: OpKind | str | None = None,
    framework: str | None = "torch",
    location: object | None = None,
    module: str | None = None,
    dtype: str | None = None,
    forward_op_kind: OpKind | str | None = None,
    input_op_kind: OpKind | str | None = None,
    used_by: list[str] | None = None,
    variant: str | None = None,
) -> list[str]:
    """Fixes for one diagnosis, best first, from ``TABLE``.

    ``variant`` picks a named row of the category first when there is one (``eps_zero``: an
    optimizer whose eps is 0).

    The op kind's own entry comes first (for a singular gradient, the forward op's; for a log,
    whether its input came from a softmax, ``input_op_kind``; for an exp, whether its output is
    normalized like a softmax's or used as a scale, ``used_by``: the kinds of the ops that read
    it), then, for an overflow in float16, the float16 entry; the category's default only when
    neither applies.

    >>> fixes_for("op_domain", op_kind="log", location="train.py:41")[0]
    'replace log(softmax(x)) with log_softmax(x) (or F.cross_entropy on the logits) at train.py:41'
    """
    c, k = Category(category), OpKind(op_kind) if op_kind else OpKind.OTHER
    fw = _K if framework in ("keras", "tensorflow", "tf") else _T
    if c is Category.SINGULAR_GRADIENT and forward_op_kind:
        k = OpKind(forward_op_kind)
    if c is Category.SINGULAR_GRADIENT and k is OpKind.POW:
        k = OpKind.SQRT  # x ** 0.5 and sqrt share the singular point and the fix
    if c is Category.OP_DOMAIN and k is OpKind.VAR:
        k = OpKind.STD
    fill = {
        "at": _at(location, module),
        "module_call": f"model.{module}" if module else "module",
        "layer": f"`{module}` " if module else "",
    }
    made_by = (
        OpKind(input_op_kind) if input_op_kind else None
    )  # the op that made the input, if known
    if variant is not None and (c, variant) in TABLE:
        rows = [TABLE[(c, variant)]]
    elif c is Category.OP_DOMAIN and k is OpKind.LOG and made_by and made_by not in _SOFTMAXES:
        rows = [TABLE[(c, "log_not_of_softmax")]]
    elif (
        c is Category.OVERFLOW
        and k is OpKind.EXP
        and used_by is not None
        and not set(used_by) & _NORMALIZERS
    ):
        rows = [TABLE[(c, "exp_of_raw")]]  # not normalized by a sum: a scale, not a softmax
    else:
        rows = [TABLE.get((c, k), ())]
    if c is Category.OVERFLOW and dtype == "float16":
        rows.append(TABLE[(c, "float16")])
    if not any(rows):
        rows = [TABLE.get((c, None), TABLE[(Category.UNKNOWN, None)])]
    return [f.text(fw, **fill) for row in rows for f in row]


def loss_scale_fixes(
    framework: str | None = "torch", *, forward_overflow: bool = False
) -> list[str]:
    """What to do when the dynamic loss scale collapses (every step skipped, scale halving).

    >>> loss_scale_fixes("torch")[0].startswith("find the layer")
    True
    """
    t = framework not in (_K, "keras", "tensorflow", "tf")
    locate = (
        "`nanscope.torch.amp.locate_overflow(model, inputs, dtype=torch.float16)`"
        if t
        else "`nanscope.keras.headroom(model, batch)`"
    )
    fixes = [
        f"find the layer whose float16 output or gradient is Inf at every scale: {locate}, then keep it in float32",
        "train in bfloat16 instead of float16: no loss scaling is needed and the range is float32's",
        "check the loss itself: a loss that is already Inf/NaN in float32 makes every step skip (run `nanscope run` "
        "in float32)",
    ]
    if forward_overflow:
        fixes[0] = "the forward pass overflows float16 whatever the scale: " + fixes[0]
    return fixes


def audit_fixes(
    problem: str,
    framework: str | None = "torch",
    *,
    ignore_index: int | None = None,
    num_classes: int | None = None,
) -> list[str]:
    """Fixes for what a dataset or checkpoint audit (`nanscope data`, `inspect`) found.

    ``problem`` is one of: ``constant_input``, ``unnormalized_input``, ``extreme_input``,
    ``label_out_of_range``, ``all_ignored``, ``unused_class``, ``soft_label_sum``,
    ``half_overflow``, ``optimizer_half_overflow``.

    >>> audit_fixes("label_out_of_range", num_classes=21, ignore_index=255)[0].split(": ")[0]
    'remap or drop labels outside [0, 21)'
    """
    t = framework not in (_K, "keras", "tensorflow", "tf")
    ign = f" {ignore_index}" if ignore_index is not None else ""
    rng = f"[0, {num_classes})" if num_classes is not None else "[0, num_classes)"
    texts = {
        "constant_input": [
            "drop constant samples or check how they were produced (a blank or failed crop, an all-black frame)",
            "per-sample normalization x / x.std() divides by zero on them: add an epsilon, `(x - m) / (s + 1e-6)`",
        ],
        "unnormalized_input": [
            "scale the inputs to 0..1 or standardize them: "
            + (
                "`transforms.ToTensor()` + `transforms.Normalize(mean, std)` with the per-channel numbers above"
                if t
                else "`keras.layers.Rescaling(1/255)` or `keras.layers.Normalization()` adapted on the data"
            ),
            "un-normalized 0..255 inputs make early activations and gradients 100-1000x larger than the "
            "initialization expects",
        ],
        "extreme_input": [
            "clip or rescale the inputs: values beyond 65504 overflow float16 under mixed precision",
            "look for sentinel values (1e30, -9999) that should be masked instead",
        ],
        "label_out_of_range": [
            f"remap or drop labels outside {rng}: pass the model num_classes=N matching the labels, or mark "
            f"unlabeled pixels with ignore_index{ign}",
            "cross-entropy with a label >= num_classes fails on GPU (device assert) and gives garbage or NaN elsewhere",
        ],
        "all_ignored": [
            f"skip samples whose every target is ignore_index{ign}, or average the loss with max(1, valid count)",
            "use `nanscope.losses.cross_entropy(..., ignore_index=...)`, which returns 0 instead of 0/0 for them",
        ],
        "unused_class": [
            "check the class list against the labels: a class that never occurs is never learned",
            "if it is expected (rare class), weight the loss or resample",
        ],
        "soft_label_sum": [
            "normalize each soft-label row to sum to 1 (divide by its sum), or fix the label smoothing / mixup code",
        ],
        "half_overflow": [
            "keep these weights in float32 (do not call .half() on the whole model; use autocast / mixed precision)"
            if t
            else "keep these layers in float32 (dtype='float32') under the mixed_float16 policy",
            "rescale the layer or retrain with weight decay: values past 65504 become Inf in float16",
        ],
        "optimizer_half_overflow": [
            "keep the optimizer state in float32: Adam's exp_avg_sq squares the gradients and overflows float16",
            "raise the epsilon to one float16 can hold (eps=1e-4), or use bfloat16",
        ],
    }
    return list(texts.get(problem, ["inspect the reported samples or tensors"]))
