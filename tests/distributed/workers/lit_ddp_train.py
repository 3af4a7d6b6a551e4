"""A user's Lightning script, unchanged, no nanscope in it: ``Trainer(strategy="ddp",
devices=2)`` on CPU. Run as ``python lit_ddp_train.py``, Lightning starts rank 1 itself (it
runs this script again); under ``torchrun --nproc-per-node 2`` it starts nothing. Rank 1's
table holds one corrupt record: a NaN feature in row 27 (where its distributed sampler puts it,
the script prints, as a user checking by hand would); ``--clean`` leaves it whole. Each rank
prints a digest of its final weights."""

import hashlib
import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        bad = ~torch.isfinite(x).all(dim=1)
        if bad.any():
            rows = torch.nonzero(bad).flatten().tolist()
            print(f"rank {self.trainer.global_rank} batch {batch_idx}: bad rows {rows}", flush=True)
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self):
        rank = self.trainer.global_rank
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(48, 10, generator=g), torch.randint(0, 4, (48,), generator=g)
        if rank == 1 and "--clean" not in sys.argv:
            x[27, 2] = float("nan")
        return DataLoader(TensorDataset(x, y), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Classifier()
    trainer.fit(model)
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    print(f"rank {trainer.global_rank}: weights {weights.hexdigest()[:16]}", flush=True)
