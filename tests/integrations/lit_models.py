"""Tiny Lightning modules that really go NaN, for the integration tests (and the DDP script)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

BAD_BATCH = 3  # the batch whose inputs are so large that the softmax underflows to exactly 0


def data(
    n_batches: int = 6, batch: int = 8, bad: int | None = BAD_BATCH, seed: int = 0
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, 10, generator=g)
    y = torch.randint(0, 4, (n_batches * batch,), generator=g)
    if bad is not None:
        x[bad * batch : (bad + 1) * batch] *= (
            1e4  # confident logits: softmax rounds some classes to 0
        )
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def hand_written_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits, dim=1)
    return -(torch.log(p) * F.one_hot(y, 4)).sum(1).mean()  # log(0) * 0 = NaN


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.1, scheduler: bool = True, norm: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers = (
            [torch.nn.Linear(10, 16)]
            + ([torch.nn.BatchNorm1d(16)] if norm else [])
            + [torch.nn.ReLU(), torch.nn.Linear(16, 4)]
        )
        self.body = torch.nn.Sequential(*layers)
        self.skip = torch.nn.Linear(10, 4)  # a residual path that BatchNorm does not normalize
        self.lr = lr
        self.use_scheduler = scheduler

    def forward(self, x):
        return self.body(x) + self.skip(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = hand_written_nll(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = hand_written_nll(self(x), y)
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.use_scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ManualNet(Net):
    def __init__(self, **kw) -> None:
        super().__init__(scheduler=False, **kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = hand_written_nll(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def trainer(callbacks, *, max_steps: int = 6, precision: str = "32-true", **kw) -> pl.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


class Recorder(pl.Callback):
    """Weights, BatchNorm buffers and the learning rate before and after every batch."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.lr_before: dict[int, float] = {}
        self.lr_after: dict[int, float] = {}

    @staticmethod
    def _state(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[batch_idx] = self._state(pl_module)
        self.lr_before[batch_idx] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[batch_idx] = self._state(pl_module)
        self.lr_after[batch_idx] = trainer.optimizers[0].param_groups[0]["lr"]

    def unchanged(self, i: int) -> bool:
        return all(torch.equal(self.before[i][k], self.after[i][k]) for k in self.before[i])
