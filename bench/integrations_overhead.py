"""What do nanscope.lightning.NanGuard and nanscope.hf.NanGuardCallback cost on a healthy step?

The same loop with and without the callback, side by side in one process, interleaved round by
round (drift in the machine's speed hits both alike), medians over all timed steps after a
warm-up:

    Lightning   Trainer.fit of a small CNN (32x3x32x32 batches, SGD, step-interval StepLR);
                a step is on_train_batch_start -> on_train_batch_end, timed by a callback placed
                first and last, so NanGuard's own hooks are inside it
    HF Trainer  Trainer.train of a small GPT-2 (2 layers, 128 wide, batches of 8x64 tokens);
                a step is on_step_begin -> on_step_end (training step, clipping, check,
                optimizer and scheduler step)

Usage: python bench/integrations_overhead.py [--rounds N] [--steps N] [--out bench/results/integrations_overhead.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import nanscope.hf  # noqa: E402
from nanscope.lightning import NanGuard  # noqa: E402

WARMUP = 5


# -- Lightning ---------------------------------------------------------------------------------
class CNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.999)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LitTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *a):
        self._t = _clock()

    def on_train_batch_end(self, *a):
        self.times.append(_clock() - self._t)


def lightning_round(guarded: bool, steps: int, loader: DataLoader) -> list[float]:
    timer = (
        LitTimer()
    )  # started by the first callback, stopped by the last: NanGuard's hooks are inside
    callbacks: list[pl.Callback] = (
        [_First(timer)]
        + ([NanGuard(policy="skip", reports=None)] if guarded else [])
        + [_Last(timer)]
    )
    t = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    t.fit(CNN(), loader)
    return timer.times[WARMUP:]


class _First(pl.Callback):
    def __init__(self, timer: LitTimer) -> None:
        self.timer = timer

    def on_train_batch_start(self, *a):
        self.timer.on_train_batch_start()


class _Last(pl.Callback):
    def __init__(self, timer: LitTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, *a):
        self.timer.on_train_batch_end()


# -- HF Trainer --------------------------------------------------------------------------------
class HFTimer(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, *a, **k):
        self._t = _clock()

    def on_step_end(self, *a, **k):
        self.times.append(_clock() - self._t)


def gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=512,
        n_positions=64,
        n_embd=128,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def hf_round(
    guarded: bool, steps: int, data: list[dict[str, torch.Tensor]], tmp: str
) -> list[float]:
    timer = HFTimer()
    args = transformers.TrainingArguments(
        output_dir=tmp,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=10_000,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=gpt2(), args=args, train_dataset=data, callbacks=[timer])
    if guarded:
        nanscope.hf.guard(trainer, policy="skip", reports=None)
    trainer.train()
    return timer.times[WARMUP:]


_clock = time.process_time  # set from --clock: with one thread, CPU time is what the step costs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)"
    )
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this process's CPU time (least disturbed by other jobs on a shared VM)",
    )
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, a.threads))
    global _clock
    _clock = time.process_time if a.clock == "cpu" else time.perf_counter

    g = torch.Generator().manual_seed(0)
    images = DataLoader(
        TensorDataset(
            torch.randn(a.steps * 32, 3, 32, 32, generator=g),
            torch.randint(0, 10, (a.steps * 32,), generator=g),
        ),
        batch_size=32,
    )
    tokens = [
        {"input_ids": (ids := torch.randint(0, 512, (64,), generator=g)), "labels": ids}
        for _ in range(a.steps * 8)
    ]
    times: dict[str, list[float]] = {
        k: [] for k in ("lit plain", "lit NanGuard", "hf plain", "hf NanGuardCallback")
    }
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = [False, True] if r % 2 == 0 else [True, False]  # alternate who goes first
            for guarded in order:
                times["lit NanGuard" if guarded else "lit plain"] += lightning_round(
                    guarded, a.steps, images
                )
            for guarded in order:
                times["hf NanGuardCallback" if guarded else "hf plain"] += hf_round(
                    guarded, a.steps, tokens, tmp
                )
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        (
            "Lightning `NanGuard` (small CNN, 32x3x32x32)",
            med["lit plain"],
            med["lit NanGuard"],
            len(times["lit plain"]),
        ),
        (
            "HF `NanGuardCallback` (GPT-2 2x128, 8x64 tokens)",
            med["hf plain"],
            med["hf NanGuardCallback"],
            len(times["hf plain"]),
        ),
    ]
    lines = [
        "# Healthy-step overhead of the library integrations",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or platform.platform()}), "
        f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, transformers {transformers.__version__}; "
        f"{time.strftime('%Y-%m-%d')}.",
        f"Command: `python bench/integrations_overhead.py --rounds {a.rounds} --steps {a.steps} "
        f"--threads {a.threads} --clock {a.clock}` ({a.rounds} interleaved rounds, {a.steps} steps each, first "
        f"{WARMUP} of each run not timed). Load average at the end: "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}.",
        "",
        "| loop | plain step (median) | with nanscope (median) | ratio | timed steps per mode |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, p, gd, n in rows:
        lines.append(f"| {name} | {p * 1e3:.2f} ms | {gd * 1e3:.2f} ms | **{gd / p:.3f}x** | {n} |")
    lines += [
        "",
        "Target: at most 1.02x. The VM is shared, so a single ratio moves by a percent or two between runs.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
