"""A healthy class-style run: a Trainer over a DataLoader (shuffled), an LSTM tagger with
padding, gradient clipping, a validation pass; the final weights go to argv[1]."""

import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 12, padding_idx=0)
        self.lstm = nn.LSTM(12, 16, batch_first=True)
        self.out = nn.Linear(16, 5)

    def forward(self, tokens):
        h, _ = self.lstm(self.embed(tokens))
        return self.out(h)


class Trainer:
    def __init__(self, model):
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        self.loss = nn.CrossEntropyLoss(ignore_index=-100)

    def epoch(self, loader):
        self.model.train()
        for tokens, tags in loader:
            self.opt.zero_grad()
            loss = self.loss(self.model(tokens).flatten(0, 1), tags.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        return loss.item()

    @torch.no_grad()
    def validate(self, loader):
        self.model.eval()
        return sum(self.loss(self.model(t).flatten(0, 1), y.flatten()).item() for t, y in loader)


torch.manual_seed(0)
tokens = torch.randint(1, 30, (24, 7))
tokens[:, 5:] = 0
tags = torch.randint(0, 5, (24, 7))
tags[:, 5:] = -100
data = DataLoader(TensorDataset(tokens, tags), batch_size=6, shuffle=True)
trainer = Trainer(Tagger())
for e in range(2):
    print(f"epoch {e} loss {trainer.epoch(data):.6f} val {trainer.validate(data):.6f}")
torch.save(trainer.model.state_dict(), sys.argv[1])
