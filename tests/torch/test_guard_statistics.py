"""A batch whose variance overflows float32 inside BatchNorm: the normalized output is 0, so
the loss and every gradient stay finite, but the running variance becomes +Inf. Training
looks healthy; eval mode and inference then give NaN. The guard must keep the statistics out
(skip: the running buffers as before the step) and say what happened, not "transient"."""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanscope.torch import Guard


def test_overflowing_batch_variance_is_corrupt_statistics_written_by_the_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(11)
    batches = [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)
    ]
    x = batches[1][0]
    x[:, :] = x[:, :1] * 3e19  # a sensor reading in the wrong unit...
    x[0, :] = -3e19  # ...and one row of the opposite sign: the batch variance overflows

    def train_step(batch):
        inputs, labels = batch
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    guard = Guard(model, opt, policy="skip", reports=None)
    stats = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in batches:
            before = model[1].running_var.clone()
            guard.step(train_step, batch)
            stats.append(torch.equal(before, model[1].running_var))
    d = guard.last
    assert guard.skipped == 1 and not guard.should_stop
    assert stats == [False, True, False]  # the bad step's statistics were kept out
    assert torch.isfinite(model[1].running_var).all()
    assert (d.category.value, d.phase.value, d.module, d.step) == (
        "corrupt_norm_statistics",
        "forward",
        "1",
        1,
    )
    assert any("running_var" in e and "+Inf" in e for e in d.evidence)
    model.eval()
    assert torch.isfinite(model(batches[2][0])).all()  # inference is fine afterwards
