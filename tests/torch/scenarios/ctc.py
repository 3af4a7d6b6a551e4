"""A tiny speech-style model trained with CTC; one utterance's transcript is longer than its
audio (more labels than frames), so no alignment exists and CTC returns +Inf."""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

BAD_BATCH, BAD_SAMPLE = 1, 1
FRAMES, CLASSES = 6, 5


class Recognizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, CLASSES)

    def forward(self, x):  # (T, N, 4) -> (T, N, C) log-probabilities
        return F.log_softmax(self.proj(x), dim=-1)


def build():
    torch.manual_seed(0)
    model = Recognizer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    batches = []
    for b in range(3):
        x = torch.randn(FRAMES, 3, 4, generator=g)
        lengths = torch.tensor([3, 2, 3])
        if b == BAD_BATCH:
            lengths[BAD_SAMPLE] = FRAMES + 2  # transcript longer than the audio
        targets = torch.randint(1, CLASSES, (3, int(lengths.max())), generator=g)
        batches.append((x, (targets, lengths)))

    def train_step(batch):
        x, (targets, target_lengths) = batch
        log_probs = model(x)
        input_lengths = torch.full((x.shape[1],), FRAMES, dtype=torch.long)
        loss = F.ctc_loss(log_probs, targets, input_lengths, target_lengths)
        loss.backward()
        return loss

    return types.SimpleNamespace(
        model=model, optimizer=optimizer, batches=batches, train_step=train_step
    )


def main():
    s = build()
    for i, batch in enumerate(s.batches):
        s.optimizer.zero_grad()
        loss = s.train_step(batch)
        s.optimizer.step()
        print(f"step {i} loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
