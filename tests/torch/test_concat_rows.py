"""Batch rows through torch.cat / torch.stack of several batches (siamese pairs, triplets,
contrastive views): the samples a diagnosis names are rows of the user's batch, and which
of the concatenated tensors they sit in is evidence. Real small models that really go NaN."""

from __future__ import annotations

import torch
import torch.nn as nn

from nanscope.torch.trace import trace_step


class Embed(nn.Module):
    """No bias anywhere: an all-zero input embeds to exactly 0, and its L2 norm is 0."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        z = self.fc(x)
        return z / z.norm(dim=-1, keepdim=True)


def _batches(bad_part: int, bad_row: int, parts: int = 3, rows: int = 4):
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(rows, 6, generator=g) for _ in range(parts)]
    xs[bad_part][bad_row] = 0.0
    return xs


def test_triplet_stacked_then_flattened_names_the_negative_sample():
    torch.manual_seed(0)
    model = Embed()
    anchor, positive, negative = _batches(bad_part=2, bad_row=1)

    def step():
        emb = model(torch.stack([anchor, positive, negative]).flatten(0, 1))
        a, p, n = emb.view(3, 4, -1).unbind(0)
        return torch.relu((a - p).pow(2).sum(1) - (a - n).pow(2).sum(1) + 1).mean()

    d = trace_step(step, model=model)
    assert (d.category, d.op_kind, d.samples) == ("op_domain", "div", [1])
    assert any(
        e.startswith("rows concatenated by torch.stack at ")
        and e.endswith("(3 tensors of 4 rows): sample 1 of the third tensor of the 3")
        for e in d.evidence
    ), d.evidence


def test_stacked_views_keep_the_part_on_dim_0():
    torch.manual_seed(0)
    fc = nn.Linear(6, 4, bias=False)
    v1, v2 = _batches(bad_part=0, bad_row=3, parts=2)

    def step():
        z = torch.stack([fc(v1), fc(v2)])  # (2 views, 4 samples, 4)
        return (z / z.norm(dim=-1, keepdim=True)).sum()

    d = trace_step(step, model=fc)
    assert (d.category, d.op_kind, d.samples) == ("op_domain", "div", [3])
    assert any(e.endswith("sample 3 of the first tensor of the pair") for e in d.evidence)


def test_slices_of_the_concatenation_keep_their_rows():
    torch.manual_seed(0)
    model = Embed()
    anchor, positive = _batches(bad_part=1, bad_row=2, parts=2)

    def step():
        emb = torch.cat([anchor, positive]) * 2
        zp = emb[4:]  # the positives, normalized after the slice
        zp = zp / zp.sum(1, keepdim=True).abs().clamp_max(0)  # 0 where every row is positive
        return model(emb).sum() + zp.sum()

    d = trace_step(step, model=model)
    # the first NaN is the slice's division (every row of the positives): samples 0..3, second tensor
    assert d.op_kind == "div" and d.samples == [0, 1, 2, 3], d
    assert any(
        e.endswith("samples 0, 1, 2, 3 of the second tensor of the pair") for e in d.evidence
    )


def test_unequal_parts_are_not_read_as_pairs():
    """A cat of a labeled and an unlabeled batch of other sizes: rows stay rows."""
    torch.manual_seed(0)
    model = Embed()
    g = torch.Generator().manual_seed(0)
    labeled, unlabeled = torch.rand(4, 6, generator=g), torch.rand(2, 6, generator=g)
    unlabeled[1] = 0.0

    def step():
        return model(torch.cat([labeled, unlabeled])).sum()

    d = trace_step(step, model=model)
    assert d.samples == [5] and not any("concatenated" in e for e in d.evidence)


def test_a_dataloader_collate_stack_is_the_batch_itself():
    """default_collate stacks the samples: that stack is the batch, not a pair of batches."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = Embed()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 6, generator=g)
    x[2] = 0.0
    loader = DataLoader(TensorDataset(x), batch_size=4)

    def step():
        (batch,) = next(iter(loader))
        return model(batch).sum()

    d = trace_step(step, model=model)
    assert (d.op_kind, d.samples) == ("div", [2])
    assert not any("concatenated" in e for e in d.evidence), d.evidence
