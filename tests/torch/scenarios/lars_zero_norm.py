"""A class-based trainer with a hand-written LARS optimizer (layer-wise trust ratio
``eta * ||w|| / ||g||``) on a two-head model: the auxiliary head is trained on every other
batch only, and ``zero_grad(set_to_none=False)`` leaves its gradients at exactly 0 on the
others. Then ||g|| = 0 and the trust ratio of ``aux.weight`` divides by zero (x / 0 = Inf;
Inf * 0 = NaN in the update)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1, eta=0.02, momentum=0.9):
        super().__init__(params, dict(lr=lr, eta=eta, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                trust = group["eta"] * p.norm() / p.grad.norm()  # TRUST_LINE
                state = self.state[p]
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(group["lr"] * trust * p.grad)
                p.sub_(buf)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.main = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 1)

    def forward(self, x):
        h = self.body(x)
        return self.main(h), self.aux(h)


class Trainer:
    def __init__(self, model):
        self.model = model
        self.opt = LARS(model.parameters())

    def train_step(self, step, x, y, y_aux):
        self.opt.zero_grad(set_to_none=False)
        logits, aux = self.model(x)
        loss = F.cross_entropy(logits, y)
        if step % 2 == 1:  # the auxiliary task on every other batch
            loss = loss + F.mse_loss(aux.squeeze(1), y_aux)
        loss.backward()
        self.opt.step()
        return loss.item()


if __name__ == "__main__":
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    trainer = Trainer(TwoHeads())
    for step in range(4):
        x = torch.randn(8, 6, generator=g)
        y, y_aux = torch.randint(0, 3, (8,), generator=g), torch.randn(8, generator=g)
        print(f"step {step} loss {trainer.train_step(step, x, y, y_aux):.4f}")
