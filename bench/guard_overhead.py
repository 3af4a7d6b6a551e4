"""What does nanscope.torch.Guard cost on a healthy step, and how long does a failure take
to diagnose?

Side by side in one process, interleaved round by round (so drift in the machine's speed
hits every mode alike), after a warm-up, medians over all timed steps:

    plain            zero_grad + forward + loss + backward + optimizer.step
    guard            the same through Guard(policy="skip").step (weights checked every 10th step)
    guard, w/1       Guard(check_weights_every=1): weights checked on every step too
    detect_anomaly   torch.autograd.detect_anomaly(check_nan=True) around the step
    hook checker     a naive checker: a forward hook on every module, isfinite(out).all() each

Models: a small CNN (32x3x32x32 batches) and torchvision's ResNet-50 (weights=None,
8x3x64x64 batches so that it runs on a CPU). Then failure -> diagnosis: one Guard.step on a
batch whose loss takes log(0) (no bad input, so the guard has to replay the step under full
per-op instrumentation), as a multiple of the median plain step; without and with the repro
bundle write.

Usage: python bench/guard_overhead.py [--rounds N] [--steps N] [--out bench/results/guard_overhead.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanscope.torch import Guard


def small_cnn() -> nn.Module:
    return nn.Sequential(
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


def resnet50() -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=10)


class Setup:
    def __init__(self, make, batch_shape, seed=0):
        torch.manual_seed(seed)
        self.model = make()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        n = batch_shape[0]
        self.batch = (
            torch.randn(*batch_shape, generator=g),
            torch.randint(0, 10, (n,), generator=g),
            torch.ones(n),
        )
        bad_scale = torch.ones(n)
        bad_scale[n // 2] = 0.0  # log(0) in the loss: found only by replaying the step
        self.bad_batch = (self.batch[0], self.batch[1], bad_scale)

    def train_step(self, batch):
        x, y, scale = batch
        loss = F.cross_entropy(self.model(x), y) + torch.log(scale).mean()
        loss.backward()
        return loss


def hook_checker(model: nn.Module):
    def check(module, args, out):
        if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
            raise FloatingPointError(f"non-finite output of {type(module).__name__}")

    return [m.register_forward_hook(check) for m in model.modules()]


def run_mode(setup: Setup, mode: str, guards: dict, steps: int) -> list[float]:
    times = []
    m, opt = setup.model, setup.optimizer
    handles = hook_checker(m) if mode == "hook checker" else []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            if mode.startswith("guard"):
                guards[mode].step(setup.train_step, setup.batch)
            else:
                ctx = (
                    torch.autograd.detect_anomaly(check_nan=True)
                    if mode == "detect_anomaly"
                    else nullcontext()
                )
                opt.zero_grad(set_to_none=True)
                with ctx:
                    setup.train_step(setup.batch)
                opt.step()
            times.append(time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
    return times


MODES = ["plain", "guard", "guard, w/1", "detect_anomaly", "hook checker"]


def bench_model(name, make, batch_shape, rounds, steps, warmup=3, modes=None):
    modes = modes or MODES
    setup = Setup(make, batch_shape)
    guards = {
        "guard": Guard(setup.model, setup.optimizer, policy="skip", reports=None),
        "guard, w/1": Guard(
            setup.model, setup.optimizer, policy="skip", reports=None, check_weights_every=1
        ),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # detect_anomaly warns on every use
        for mode in modes:
            run_mode(setup, mode, guards, warmup)
        samples: dict[str, list[float]] = {m: [] for m in modes}
        rng = random.Random(0)
        for _ in range(rounds):
            order = modes[:]
            rng.shuffle(order)
            for mode in order:
                samples[mode] += run_mode(setup, mode, guards, steps)
    med = {m: statistics.median(v) for m, v in samples.items()}
    # Failure -> diagnosis: a fresh guard each time (so every failure is explained in full).
    diag, with_bundle = [], []
    reports = tempfile.mkdtemp(prefix="nanscope-bench-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            for bundle, out in ((False, diag), (True, with_bundle)):
                g = Guard(
                    setup.model, setup.optimizer, policy="skip", reports=reports if bundle else None
                )
                t0 = time.perf_counter()
                g.step(setup.train_step, setup.bad_batch)
                out.append(time.perf_counter() - t0)
                assert g.last is not None and g.last.op_kind == "log", g.last
    # The guard's own work on a healthy step, isolated (min of 30, so machine noise cannot add):
    # preparing (BatchNorm snapshot, RNG state; zero_grad is left out, plain does it too) and the
    # fused check over loss + gradients + buffers, without and with all the weights.
    g = guards["guard"]
    loss = setup.train_step(setup.batch)

    def best_of(fn, n=30):
        best = float("inf")
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    g.zero_grad = False
    prepare = best_of(g._before)
    g.zero_grad = True
    own = {
        "prepare": prepare,
        "check": best_of(lambda: g._check(loss, 1)),
        "check+weights": best_of(lambda: g._check(loss, 0)),
    }
    params = sum(p.numel() for p in setup.model.parameters())
    return {
        "name": name,
        "batch": "x".join(map(str, batch_shape)),
        "params": params,
        "med": med,
        "n": {m: len(v) for m, v in samples.items()},
        "diag": statistics.median(diag),
        "bundle": statistics.median(with_bundle),
        "own": own,
        "plain_min": min(samples["plain"]),
    }


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(results, args) -> str:
    lines = [
        "# Guard overhead (bench/guard_overhead.py)",
        "",
        f"Machine: 2-core CPU VM ({cpu_name()}, {os.cpu_count()} logical CPUs, torch threads "
        f"{torch.get_num_threads()}), no GPU. Date: 2026-11-22. torch {torch.__version__}, Python "
        f"{platform.python_version()}.",
        f"Load average at start / end: {args.load_start} / {args.load_end} (other jobs shared the 2 cores; "
        "interleaving spreads their effect over all modes, but single ratios carry a few % of noise).",
        f"Method: one process; modes interleaved in shuffled order, {args.rounds} rounds x {args.steps} steps "
        "per mode after 3 warm-up steps; median step time. A step = zero_grad + forward + loss + backward + "
        "optimizer.step (SGD, momentum 0.9).",
        "",
        "## Healthy step: median time, ratio to plain",
        "",
        "| model | params | batch | plain | guard | guard, weights every step | detect_anomaly(check_nan) | "
        "forward-hook checker |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        p = r["med"]["plain"]
        cells = [f"{p * 1e3:.1f} ms"] + [
            f"{r['med'][m] * 1e3:.1f} ms ({r['med'][m] / p:.3f}x)" if m in r["med"] else "not run"
            for m in MODES[1:]
        ]
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['batch']} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "The guard's own work per healthy step, isolated (prepare + fused check, min of 30 runs, so that "
        "machine noise cannot inflate it), against the fastest plain step:",
        "",
        "| model | prepare | fused check | fused check + all weights (every `check_weights_every` steps) | "
        "fastest plain step | (prepare + check) / plain | amortized with weights every 10th step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        o, p = r["own"], r["plain_min"]
        base = o["prepare"] + o["check"]
        amortized = o["prepare"] + 0.9 * o["check"] + 0.1 * o["check+weights"]
        lines.append(
            f"| {r['name']} | {o['prepare'] * 1e3:.2f} ms | {o['check'] * 1e3:.2f} ms | "
            f"{o['check+weights'] * 1e3:.2f} ms | {p * 1e3:.1f} ms | {base / p * 100:.1f}% | "
            f"{amortized / p * 100:.1f}% |"
        )
    lines += [
        "",
        "## Failure to diagnosis",
        "",
        "One `Guard.step` on a batch whose loss takes log(0) (the batch itself is finite, so the guard restores "
        "BatchNorm buffers and RNG and replays the step under full per-op tracing), median of 3, as a multiple "
        "of the median plain step.",
        "",
        "| model | diagnosis | ratio | diagnosis + repro bundle | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        p = r["med"]["plain"]
        lines.append(
            f"| {r['name']} | {r['diag'] * 1e3:.0f} ms | {r['diag'] / p:.1f}x | {r['bundle'] * 1e3:.0f} ms | "
            f"{r['bundle'] / p:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "guard_overhead.md")
    )
    ap.add_argument("--only", choices=["cnn", "resnet50"], default=None)
    ap.add_argument(
        "--full-size", action="store_true", help="also ResNet-50 on 8x3x224x224 (plain vs guard)"
    )
    args = ap.parse_args(argv)
    args.load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    results = []
    if args.only in (None, "cnn"):
        results.append(
            bench_model("small CNN", small_cnn, (32, 3, 32, 32), args.rounds, args.steps * 4)
        )
    if args.only in (None, "resnet50"):
        results.append(bench_model("ResNet-50", resnet50, (8, 3, 64, 64), args.rounds, args.steps))
        if (
            args.full_size
        ):  # the same model on full-size images: the guard's cost per step is the same
            results.append(
                bench_model(
                    "ResNet-50",
                    resnet50,
                    (8, 3, 224, 224),
                    max(2, args.rounds // 3),
                    2,
                    warmup=1,
                    modes=["plain", "guard"],
                )
            )
    args.load_end = " ".join(f"{x:.1f}" for x in os.getloadavg())
    text = report(results, args)
    print(text)
    if args.out != "-":
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
