"""A Lightning classifier as its docs write one: automatic optimization, so Lightning calls
optimizer.step(closure) and forward, loss and backward all run inside step(). The loss is
written by hand, -sum(y * log(softmax(z))); a confident wrong prediction gives log(0)."""

import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        probs = torch.softmax(self(x), dim=1)
        loss = -(F.one_hot(y, 3) * torch.log(probs)).sum(1).mean()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


torch.manual_seed(0)
x = torch.randn(32, 8)
y = torch.randint(0, 3, (32,))
x[21] = 500.0 * torch.sign(torch.randn(8))  # a sample so large the softmax saturates to exact 0s
model = Classifier()
trainer = pl.Trainer(
    max_epochs=1,
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
finite = all(torch.isfinite(p).all() for p in model.parameters())
print("weights finite:", bool(finite))
sys.exit(0)
