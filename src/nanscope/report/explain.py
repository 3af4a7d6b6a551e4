"""Each root-cause category in plain words, for the report's reader (not the JSON's)."""

from __future__ import annotations

EXPLANATIONS: dict[str, tuple[str, str]] = {
    # category: (title, what it means and what usually causes it)
    "nonfinite_input": (
        "The data itself was broken",
        "The batch already held NaN or Inf before the model touched it. The model, the loss and the "
        "optimizer are innocent: a corrupt file, a division by a zero standard deviation in the "
        "preprocessing or a missing value put it there.",
    ),
    "invalid_target": (
        "The labels made the loss impossible",
        "The targets were non-finite, out of range for the number of classes, or there was nothing "
        "to average over: when every pixel of a mask is ignore_index, a mean loss is 0 / 0 = NaN.",
    ),
    "op_domain": (
        "An operation got a value it is not defined for",
        "Finite inputs, but outside the operation's domain: log of zero or a negative number, the "
        "square root of a negative, a division by zero, inf - inf. The input was legal for the "
        "framework and illegal for the mathematics.",
    ),
    "overflow": (
        "A number grew past what its type can hold",
        "The inputs were finite, but the result exceeded the dtype's range (float16 stops at 65504, "
        "float32 near 3.4e38). Typical: exp of a large logit, an activation that grows under "
        "float16 autocast, a loss scale that keeps halving.",
    ),
    "singular_gradient": (
        "The forward pass was fine, the derivative was not",
        "The values were finite, but an operation's derivative is infinite or undefined at its input: "
        "sqrt or a norm at exactly 0, pow at 0, or a torch.where whose discarded branch is NaN (its "
        "gradient still flows through the mask).",
    ),
    "exploding_gradients": (
        "Gradients grew step after step until they overflowed",
        "Nothing broke at once: every step made the weights and gradients larger until one "
        "overflowed. The cause is the training set-up (learning rate too high, no clipping, no "
        "warm-up), not the op where it finally overflowed.",
    ),
    "nonfinite_parameters": (
        "The weights were already broken",
        "A parameter was NaN or Inf before this step ran: a bad checkpoint was loaded, or an earlier "
        "update wrote non-finite values that nobody checked.",
    ),
    "corrupt_norm_statistics": (
        "BatchNorm's running statistics are corrupt",
        "A normalization layer's running mean or variance is NaN, Inf, negative or extreme. Training "
        "mode uses the batch's own statistics and looks fine; evaluation and inference use the stored "
        "ones and produce NaN.",
    ),
    "optimizer_state": (
        "The optimizer's own state went bad",
        "The optimizer's moments or step size became non-finite, for example an Adam epsilon that "
        "rounds to zero in float16 so the update divides by zero, or a non-finite learning rate.",
    ),
    "all_masked_softmax": (
        "A softmax over a row where everything was masked",
        "Every entry of a softmax row was -Inf (all keys masked, an empty sequence padded out): "
        "exp(-inf) / sum(exp(-inf)) is 0 / 0 = NaN.",
    ),
    "compiled_numerics": (
        "The compiled step changed the numbers",
        "The compiled step (torch.compile, XLA) went non-finite, but the same step replayed eagerly "
        "from the same state and batch stayed finite: the compiler's fusion or precision is to blame.",
    ),
    "transient": (
        "It did not happen again",
        "Replaying the same step from the same state and batch stayed finite: a non-deterministic "
        "kernel, a data race or a faulty device.",
    ),
    "unknown": (
        "The root cause could not be established",
        "nanscope saw a non-finite value but none of its rules explained it; the evidence below is "
        "everything it collected.",
    ),
}


def explain(category: str) -> tuple[str, str]:
    """``(title, explanation)`` for a category; an unknown string gets a neutral text.

    >>> explain("op_domain")[0]
    'An operation got a value it is not defined for'
    """
    return EXPLANATIONS.get(
        str(category), (str(category).replace("_", " ").capitalize(), "See the evidence below.")
    )
