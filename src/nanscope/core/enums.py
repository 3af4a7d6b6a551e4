"""Closed vocabularies of the diagnosis contract (../shared/DIAGNOSIS.md).

Every value is an ``enum.StrEnum``, so code accepts ``"skip"`` as well as ``Policy.SKIP`` and
the JSON carries plain strings. Extend freely; never rename or drop a value.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Category(StrEnum):
    """Root cause of a non-finite failure: exactly one per diagnosis."""

    NONFINITE_INPUT = "nonfinite_input"
    INVALID_TARGET = "invalid_target"
    OP_DOMAIN = "op_domain"
    OVERFLOW = "overflow"
    SINGULAR_GRADIENT = "singular_gradient"
    EXPLODING_GRADIENTS = "exploding_gradients"
    NONFINITE_PARAMETERS = "nonfinite_parameters"
    CORRUPT_NORM_STATISTICS = "corrupt_norm_statistics"
    OPTIMIZER_STATE = "optimizer_state"
    ALL_MASKED_SOFTMAX = "all_masked_softmax"
    COMPILED_NUMERICS = "compiled_numerics"  # the compiled step failed, its eager replay did not
    TRANSIENT = "transient"  # the failure did not reproduce when replayed from the same state
    UNKNOWN = "unknown"


class Phase(StrEnum):
    """Where in a training step the first non-finite value appeared."""

    DATA = "data"
    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"
    STATE = "state"


class Policy(StrEnum):
    """What a guard does when a step would make training non-finite."""

    RAISE = "raise"  # raise NonFiniteError carrying the diagnosis
    SKIP = "skip"  # do not apply the update, keep training
    STOP = "stop"  # end training gracefully
    WARN = "warn"  # warn and let the update through


class Status(StrEnum):
    CLEAN = "clean"
    NONFINITE = "nonfinite"
    PROBLEMS = "problems"


class OpKind(StrEnum):
    """Lower-case math name of a producer op, the same in every framework."""

    LOG = "log"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    DIV = "div"
    EXP = "exp"
    POW = "pow"
    SOFTMAX = "softmax"
    LOG_SOFTMAX = "log_softmax"
    MATMUL = "matmul"
    CONV = "conv"
    BATCH_NORM = "batch_norm"
    LAYER_NORM = "layer_norm"
    MEAN = "mean"
    SUM = "sum"
    STD = "std"
    VAR = "var"
    MUL = "mul"
    ADD = "add"
    SUB = "sub"
    ACOS = "acos"
    ASIN = "asin"
    CROSS_ENTROPY = "cross_entropy"
    CTC_LOSS = "ctc_loss"
    OTHER = "other"

    @classmethod
    def of(cls, op_name: str | None) -> OpKind:
        """Normalize a framework op name to its kind.

        >>> OpKind.of("aten::log.default"), OpKind.of("RealDiv"), OpKind.of("FusedBatchNormV3")
        (<OpKind.LOG: 'log'>, <OpKind.DIV: 'div'>, <OpKind.BATCH_NORM: 'batch_norm'>)
        >>> OpKind.of("aten::_log_softmax"), OpKind.of("aten::addmm"), OpKind.of("Frobnicate")
        (<OpKind.LOG_SOFTMAX: 'log_softmax'>, <OpKind.MATMUL: 'matmul'>, <OpKind.OTHER: 'other'>)
        """
        if not op_name:
            return cls.OTHER
        name = op_name.split("::")[-1].split(".")[0]
        # CamelCase (TensorFlow) -> snake_case; then drop framework decorations.
        name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower().strip("_")
        name = re.sub(r"_v\d+$", "", name)
        name = _ALIASES.get(name, name)
        try:
            return cls(name)
        except ValueError:
            return cls.OTHER


_ALIASES = {
    # log family
    "log2": "log",
    "log10": "log",
    "log1p": "log",
    "xlogy": "log",
    "special_xlogy": "log",
    "log_": "log",
    # roots and division
    "reciprocal": "div",
    "true_divide": "div",
    "floor_divide": "div",
    "real_div": "div",
    "div_no_nan": "div",
    "divide": "div",
    "floor_div": "div",
    "div_": "div",
    # exp family
    "exp2": "exp",
    "expm1": "exp",
    "exp_": "exp",
    "pow_": "pow",
    "square": "pow",
    "float_power": "pow",
    # softmax family
    "softmax": "softmax",
    "safe_softmax": "softmax",
    "logsumexp": "log_softmax",
    "reduce_logsumexp": "log_softmax",
    "log_softmax": "log_softmax",
    # linear algebra
    "mm": "matmul",
    "bmm": "matmul",
    "addmm": "matmul",
    "linear": "matmul",
    "baddbmm": "matmul",
    "einsum": "matmul",
    "batch_mat_mul": "matmul",
    "dot": "matmul",
    "scaled_dot_product_attention": "matmul",
    "addbmm": "matmul",
    "mv": "matmul",
    "convolution": "conv",
    "conv2d": "conv",
    "conv1d": "conv",
    "conv3d": "conv",
    "cudnn_convolution": "conv",
    "mkldnn_convolution": "conv",
    "depthwise_conv2d_native": "conv",
    "conv2d_backprop_input": "conv",
    "conv_transpose2d": "conv",
    # TensorFlow spellings after CamelCase splitting (MatMul, Conv2D, BiasAdd, SqrtGrad)
    "mat_mul": "matmul",
    "conv1_d": "conv",
    "conv2_d": "conv",
    "conv3_d": "conv",
    "conv2_dbackprop_input": "conv",
    "conv2_dbackprop_filter": "conv",
    "bias_add": "add",
    "sqrt_grad": "sqrt",
    "rsqrt_grad": "rsqrt",
    # normalization
    "native_batch_norm": "batch_norm",
    "native_batch_norm_legit": "batch_norm",
    "native_batch_norm_legit_no_training": "batch_norm",
    "cudnn_batch_norm": "batch_norm",
    "fused_batch_norm": "batch_norm",
    "batch_norm_with_global_stats": "batch_norm",
    "native_layer_norm": "layer_norm",
    "group_norm": "layer_norm",
    "native_group_norm": "layer_norm",
    # reductions
    "reduce_mean": "mean",
    "reduce_sum": "sum",
    "std_mean": "std",
    "var_mean": "var",
    "reduce_std": "std",
    "reduce_variance": "var",
    # elementwise
    "add_": "add",
    "add_v2": "add",
    "sub_": "sub",
    "subtract": "sub",
    "rsub": "sub",
    "mul_": "mul",
    "multiply": "mul",
    "arccos": "acos",
    "arcsin": "asin",
    # losses
    "nll_loss": "cross_entropy",
    "nll_loss2d": "cross_entropy",
    "nll_loss_nd": "cross_entropy",
    "nll_loss_forward": "cross_entropy",
    "nll_loss2d_forward": "cross_entropy",
    "cross_entropy_loss": "cross_entropy",
    "binary_cross_entropy": "cross_entropy",
    "binary_cross_entropy_with_logits": "cross_entropy",
    "sparse_softmax_cross_entropy_with_logits": "cross_entropy",
    "softmax_cross_entropy_with_logits": "cross_entropy",
    "ctc_loss": "ctc_loss",
    "ctc_loss_tensor": "ctc_loss",
}
