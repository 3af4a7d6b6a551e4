"""A tiny language model trained on (batch, sequence) tokens; the loss is written by hand over
the flattened (batch * sequence) rows. One token's embedding is huge, so its softmax has exact
zeros and the log of them is -inf: sample 2, position 5 of the batch."""

import torch
import torch.nn as nn


class TinyLM(nn.Module):
    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.proj(
            torch.tanh(self.embed(tokens)) * self.embed(tokens).abs().amax(-1, keepdim=True)
        )


def token_nll(logits, targets):
    flat = logits.flatten(0, 1)
    probs = torch.softmax(flat, dim=-1)
    picked = probs.gather(1, targets.flatten()[:, None])
    return -torch.log(picked).mean()


torch.manual_seed(0)
model = TinyLM()
with torch.no_grad():
    model.embed.weight[7] *= 1e4  # a token whose vector blew up
opt = torch.optim.SGD(model.parameters(), lr=0.01)
tokens = torch.randint(8, 20, (4, 7))
tokens[2, 5] = 7
for step in range(2):
    opt.zero_grad()
    loss = token_nll(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.4f}")
