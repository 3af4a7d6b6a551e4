# Notebook-style regression on one big tensor, batched by hand with slices (no DataLoader):
# row 37 of the data holds a NaN, which is row 5 of the fifth batch of 8.
import torch

torch.manual_seed(0)
X = torch.randn(64, 5)
Y = X @ torch.randn(5, 1)
X[37, 2] = float("nan")
model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
bs = 8
for i in range(0, len(X), bs):
    xb, yb = X[i : i + bs], Y[i : i + bs]
    loss = torch.nn.functional.mse_loss(model(xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"batch {i // bs} loss {loss.item():.4f}")
