"""A curve fit with LBFGS, written the way its docs show: forward, loss and backward all run
inside optimizer.step(closure). The hand-written negative log-likelihood takes log of a
predicted rate that reaches 0 for one sample (a ReLU rate model)."""

import torch

torch.manual_seed(0)
x = torch.linspace(-1, 1, 16).unsqueeze(1)
counts = torch.poisson(torch.full((16, 1), 3.0))
rate = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU())
with torch.no_grad():
    rate[0].weight.fill_(2.0)
    rate[0].bias.fill_(2.0)  # x = -1 gives a rate of exactly 0
opt = torch.optim.LBFGS(rate.parameters(), lr=0.1, max_iter=5)


def nll_poisson(pred, k):
    return (pred - k * torch.log(pred)).mean()


def closure():
    opt.zero_grad()
    loss = nll_poisson(rate(x), counts)
    loss.backward()
    return loss


for it in range(3):
    loss = opt.step(closure)
    print(f"iteration {it} loss {loss.item():.4f}")
