# A healthy notebook-style run: CNN with BatchNorm and dropout, Adam, a StepLR schedule; the
# final weights go to the path given as the first argument.
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1),
    nn.BatchNorm2d(8),
    nn.ReLU(),
    nn.Dropout(0.2),
    nn.Conv2d(8, 8, 3, stride=2),
    nn.ReLU(),
    nn.AdaptiveAvgPool2d(1),
    nn.Flatten(),
    nn.Linear(8, 4),
)
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
for step in range(5):
    x, y = torch.randn(6, 3, 12, 12), torch.randint(0, 4, (6,))
    opt.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    sched.step()
    print(f"step {step} loss {loss.item():.6f}")
net.eval()
with torch.no_grad():
    print("eval", net(torch.randn(2, 3, 12, 12)).sum().item())
torch.save(net.state_dict(), sys.argv[1])
