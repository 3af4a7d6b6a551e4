"""``diagnose_eval(model, loader, loss_fn)``: "the training loss is fine, the validation loss
is NaN".

It walks the loader in eval mode (no gradients), lists the bad batches (non-finite output or
loss), and explains the first one:

1. the batch itself is bad (``check_batch``): ``nonfinite_input`` / ``invalid_target``;
2. the eval-mode output is non-finite but the train-mode output on the same batch is finite,
   and the normalization statistics are bad: ``corrupt_norm_statistics`` naming the layer
   (train mode normalizes with the batch's statistics, eval mode with the stored ones);
3. otherwise the op-level producer, traced in eval mode (``trace_step``): a mask whose every
   pixel is ``ignore_index`` is the loss averaging over 0 pixels (``invalid_target``), a log
   of 0 is ``op_domain``, and so on.

Design constraints: the model is restored as it was (every training flag, grad mode, RNG
state, buffers: the train-mode comparison moves BatchNorm running statistics); the loader is
iterated once, batches are not kept beyond the first bad one; the list of bad batches goes to
``Diagnosis.details["bad_batches"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from nanscope.core import rules
from nanscope.core.diagnosis import Diagnosis
from nanscope.core.enums import Category, Phase
from nanscope.torch._util import named_tensors, samples_of
from nanscope.torch._util import tree_finite as _finite
from nanscope.torch.checks import check_batch, check_model_state
from nanscope.torch.diagnose import call_model, preserved, split_batch
from nanscope.torch.trace import trace_step

__all__ = ["diagnose_eval"]


def _bad_samples(obj: Any) -> list[int]:
    return sorted({row for _, t in named_tensors(obj, "") for row in samples_of(t)})


def diagnose_eval(
    model: torch.nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[[Any, Any], Any],
    *,
    max_batches: int | None = None,
) -> Diagnosis | None:
    """Find the validation batches whose output or loss is non-finite, and say why.

    ``loader`` yields ``(inputs, targets)`` (or dicts, see ``diagnose``); ``loss_fn(output,
    targets)`` is the validation loss. Returns ``None`` when every batch is finite; otherwise
    the diagnosis of the first bad batch, with ``details["bad_batches"]`` (indices in the
    loader) and ``details["batch"]`` (the one explained). ``samples`` index into that batch.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> with torch.no_grad():
        ...     net[1].running_var[2] = float("nan")
        >>> data = [(torch.randn(8, 3), torch.zeros(8, 4)) for _ in range(2)]
        >>> d = diagnose_eval(net, data, torch.nn.functional.mse_loss)
        >>> d.category, d.module, d.details["bad_batches"]
        (<Category.CORRUPT_NORM_STATISTICS: 'corrupt_norm_statistics'>, '1', [0, 1])
    """
    bad: list[int] = []
    first: tuple[int, Any] | None = None
    with preserved(model):
        model.eval()
        torch.set_grad_enabled(False)
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            inputs, targets = split_batch(batch)
            ok = _finite(inputs) and _finite(targets)
            if ok:
                out = call_model(model, inputs)
                ok = _finite(out) and _finite(loss_fn(out, targets))
            if not ok:
                bad.append(i)
                if first is None:
                    first = (i, batch)
        if first is None:
            return None
        index, batch = first
        d = _explain(model, batch, loss_fn)
    d.details["bad_batches"] = bad
    d.details["batch"] = index
    d.evidence.append(
        f"{len(bad)} bad batch{'es' if len(bad) != 1 else ''} in the loader: "
        + ", ".join(map(str, bad[:20]))
        + (" …" if len(bad) > 20 else "")
    )
    return d


def _explain(model: torch.nn.Module, batch: Any, loss_fn: Callable[[Any, Any], Any]) -> Diagnosis:
    inputs, targets = split_batch(batch)
    d = check_batch(inputs, targets)
    if d is not None:
        return d
    eval_out = call_model(model, inputs)
    if _finite(eval_out):  # the output is fine: the loss made it non-finite
        return _trace(model, inputs, targets, loss_fn) or rules.not_reproduced(
            "loss",
            framework="torch",
            phase=Phase.LOSS,
            evidence=["evaluation: loss non-finite; the traced re-run of the same batch: finite"],
        )
    model.train()  # batch statistics instead of the stored ones (buffers restored by the caller)
    train_finite = _finite(call_model(model, inputs))
    model.eval()
    state = check_model_state(model)
    if state is not None and state.category is not Category.CORRUPT_NORM_STATISTICS:
        return state  # non-finite weights: they explain any output
    layers = state.details["layers"] if state is not None else {}
    producer = None if layers and train_finite else _trace(model, inputs, targets, loss_fn)
    return rules.eval_only(
        layers,
        train_finite=train_finite,
        producer=producer,
        framework="torch",
        samples=_bad_samples(eval_out),
    )


def _trace(
    model: torch.nn.Module, inputs: Any, targets: Any, loss_fn: Callable[[Any, Any], Any]
) -> Diagnosis | None:
    return trace_step(lambda: loss_fn(call_model(model, inputs), targets), model=model)
