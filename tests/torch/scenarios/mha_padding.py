"""A small text classifier with nn.MultiheadAttention (batch_first), written as a class with a
training loop; one sequence in the second batch is all padding, so its attention row masks
every key: softmax over -inf only. The heads are folded into the batch inside attention."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TextClassifier(nn.Module):
    def __init__(self, vocab=50, dim=16, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens):
        pad = tokens == 0
        h = self.embed(tokens)
        h, _ = self.attn(h, h, h, key_padding_mask=pad)
        return self.head(h.mean(1))


class Trainer:
    def __init__(self):
        torch.manual_seed(0)
        self.model = TextClassifier()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def fit(self, batches):
        for i, (tokens, labels) in enumerate(batches):
            self.opt.zero_grad()
            loss = F.cross_entropy(self.model(tokens), labels)
            loss.backward()
            self.opt.step()
            print(f"batch {i} loss {loss.item():.4f}")


g = torch.Generator().manual_seed(1)
batches = [
    (torch.randint(1, 50, (4, 7), generator=g), torch.randint(0, 2, (4,), generator=g))
    for _ in range(3)
]
batches[1][0][1] = 0  # sequence 1 of batch 1: nothing but padding
Trainer().fit(batches)
