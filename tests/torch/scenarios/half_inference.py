# Notebook-style float16 inference: the model is converted with .half() (parameters swapped by
# `param.data = ...`, which no op records), a scaled-up head overflows 65504 on every sample.
import torch

torch.manual_seed(0)
model = (
    torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    .half()
    .eval()
)
with torch.no_grad():
    model[2].weight.mul_(20000)
x = (torch.randn(3, 8) * 30).half()
with torch.no_grad():
    y = model(x)
print("prediction", y.float().sum().item())
