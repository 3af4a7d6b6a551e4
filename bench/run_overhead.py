"""What does `nanscope run` cost on a healthy training step, and how long from the failure to
the diagnosis?

`nanscope run` attaches nanscope.torch.runner to an unchanged script: a global dispatch mode
that records every aten op (references to its arguments, its module and line) and computes
nothing on the values; the values that matter are checked where the script hands them over:
the model's output, loss.item(), the gradients before the optimizer step (one fused norm).

Side by side in one process, interleaved round by round (machine drift hits both alike),
after a warm-up, medians over all timed steps of:

    plain        zero_grad + forward + loss + backward + optimizer.step + loss.item()
    empty mode   the same step under a TorchDispatchMode that only calls each op: the floor
                 of any per-op watcher (torch's Python dispatch round trip per op)
    nanscope run the same step with the runner attached (what `nanscope run` installs)
    per-op sync  reference: a dispatch mode that syncs on isfinite(out).all() after every op

Model: a small CNN (3 conv + BatchNorm + linear) on 32x3x32x32 batches. Then failure ->
diagnosis: a step whose loss takes log(0) with the runner attached; the time from the
optimizer step that sees the NaN gradient to the raised diagnosis, as a multiple of a plain step.

Then the optimizer step: the runner does not record its ops on a healthy step; it copies
what the step writes (parameters with a gradient, their state) before it, and runs the step
again, recorded, only if the weights come out non-finite. For the small CNN with SGD momentum
and, with --large, torchvision's resnet18 with Adam (8x3x112x112 batches): the copy's size and
time, beside ``opt.step()`` alone unrecorded and recorded (what recording every step cost).

Usage: python bench/run_overhead.py [--rounds N] [--steps N] [--threads N] [--clock cpu|wall]
    [--large] [--out FILE]

With --threads 1 (the default) and the CPU clock, other jobs on a shared VM disturb the
ratio least: torch's worker threads spin while they wait for a busy core, which a CPU clock
counts as work.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nanscope.core.errors import NonFiniteError
from nanscope.core.session import RunSession
from nanscope.torch import runner


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


class EmptyMode(TorchDispatchMode):
    """The floor of any per-op watcher: a dispatch mode that only calls the op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class SyncPerOp(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            bool(torch.isfinite(out).all())
        return out


def make():
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    return model, opt, x, y


def step(model, opt, x, y, loss_fn=F.cross_entropy):
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


CLOCK = time.perf_counter  # set from --clock


def step_copy_cost(model, opt, x, y, n):
    """(MiB copied, copy s, opt.step() s unrecorded, recorded, whole watched step s): medians."""
    session = RunSession(script="bench.py")
    runner.attach(session, "torch")
    r = runner._RUNNERS[id(session)]
    copy, plain, recorded, whole = [], [], [], []
    try:
        for _ in range(n + 1):
            t = CLOCK()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()  # healthy: copied before, not recorded
            whole.append(CLOCK() - t)
            t = CLOCK()
            before = r.unwatched(r._copy_before_step, opt)
            copy.append(CLOCK() - t)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            r._clear()
            for record, times in ((False, plain), (True, recorded)):  # the failure path's run
                r.in_optimizer, r.stepping = not record, record
                t = CLOCK()
                runner._undecorated_step(opt)(opt)
                times.append(CLOCK() - t)
                r.in_optimizer = r.stepping = False
                r._clear()
    finally:
        session.close()
    mib = sum(t.numel() * t.element_size() for t in before.tensors) / 2**20
    return mib, *(statistics.median(v[1:]) for v in (copy, plain, recorded, whole))


def timed(n, model, opt, x, y):
    out = []
    for _ in range(n):
        t = CLOCK()
        step(model, opt, x, y)
        out.append(CLOCK() - t)
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--large", action="store_true", help="also resnet18 + Adam (torchvision)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)"
    )
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this process's CPU time (other jobs on the VM disturb it less); wall: elapsed time",
    )
    a = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    load_start = " ".join(f"{v:.1f}" for v in os.getloadavg())
    torch.set_num_threads(max(1, a.threads))
    model, opt, x, y = make()
    modes = ["plain", "empty dispatch mode", "nanscope run", "per-op sync"]
    times = {k: [] for k in modes}
    ratios = {k: [] for k in modes}
    timed(5, model, opt, x, y)
    for rnd in range(a.rounds):
        # Paired and rotated: every round times each mode back to back, in a different order,
        # and the ratio is taken within the round, so load from other processes cancels out.
        this = {}
        for k in modes[rnd % len(modes) :] + modes[: rnd % len(modes)]:
            session = None
            ctx = (
                SyncPerOp()
                if k == "per-op sync"
                else EmptyMode()
                if k == "empty dispatch mode"
                else None
            )
            if k == "nanscope run":
                session = RunSession(script="bench.py")
                runner.attach(session, "torch")
            try:
                if ctx:
                    ctx.__enter__()
                timed(1, model, opt, x, y)
                this[k] = statistics.median(timed(a.steps, model, opt, x, y))
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
                if session:
                    session.close()
            times[k].append(this[k])
        for k in modes:
            ratios[k].append(this[k] / this["plain"])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}

    # failure -> diagnosis
    def log_zero_loss(out, y):
        return -(F.one_hot(y, 10) * torch.log(torch.softmax(out * 1e4, 1))).sum(1).mean()

    diag_times = []
    for _ in range(5):
        session = RunSession(script="bench.py")
        runner.attach(session, "torch")
        r = runner._RUNNERS[id(session)]
        try:
            opt.zero_grad()
            loss = log_zero_loss(model(x), y)
            loss.backward()
            t = CLOCK()
            try:
                opt.step()
            except NonFiniteError as err:
                diag_times.append(CLOCK() - t)
                d = err.diagnosis
        finally:
            session.close()
        del r
    diag = statistics.median(diag_times)

    # What the runner keeps between two boundaries (dropped after each optimizer step): one
    # record per op, and a copy of each state tensor an op writes (BatchNorm running stats).
    session = RunSession(script="bench.py")
    runner.attach(session, "torch")
    r = runner._RUNNERS[id(session)]
    try:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        records = len(r.records)
        copies = sum(
            ref.tensor.numel() * ref.tensor.element_size()
            for ev in r.records
            for ref in list(ev.args) + list(ev.kwargs.values())
            if isinstance(ref, runner._Ref)
            and ref.tensor is not None
            and id(ref.tensor) in r.originals
        )
        opt.step()
    finally:
        session.close()

    copies_at_step = [("small CNN, SGD momentum", *step_copy_cost(model, opt, x, y, 20))]
    if a.large:
        import torchvision

        torch.manual_seed(0)
        big = torchvision.models.resnet18(num_classes=10)
        big_opt = torch.optim.Adam(big.parameters(), lr=1e-3)
        bx, by = torch.randn(8, 3, 112, 112), torch.randint(0, 10, (8,))
        copies_at_step.append(("resnet18, Adam", *step_copy_cost(big, big_opt, bx, by, 6)))

    lines = [
        "# `nanscope run` overhead (bench/run_overhead.py)",
        "",
        f"Machine: 2-core CPU VM ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}, {a.threads} torch thread(s). "
        f"Date: {datetime.date.today().isoformat()}.",
        f"Small CNN (3 conv + BatchNorm + linear), batch 32x3x32x32, SGD momentum; {a.rounds} rounds, each "
        f"timing {a.steps} steps of every mode back to back (rotated order); medians.",
        f"Clock: {'process CPU time (all threads of this process)' if a.clock == 'cpu' else 'wall time'}. "
        f"Load average at start / end: {load_start} / {' '.join(f'{v:.1f}' for v in os.getloadavg())}; the VM is "
        "shared with other jobs, so absolute times drift and the per-round ratio is the number to read.",
        "",
        "| mode | median step (ms) | median of per-round ratios to plain |",
        "| --- | --- | --- |",
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v * 1e3:.2f} | {ratio[k]:.2f}x |")
    lines += [
        "",
        f"Failure -> diagnosis (log(0) in the loss, caught at optimizer.step, producer replayed): "
        f"{diag * 1e3:.1f} ms median = {diag / med['plain']:.1f}x a plain step; diagnosed as "
        f"`{d.category}` at `{d.op}` ({d.phase}).",
        "",
        f"Memory between boundaries: {records} op records for one forward + backward (references, "
        f"module, line: no activation is kept alive by them) and {copies / 1024:.1f} KiB of copies of the state "
        "tensors ops wrote (BatchNorm running statistics), dropped at the optimizer step. No per-op tensor is "
        "queued any more (the 0.1 runner kept one 0-d flag per op output).",
        "",
        "Optimizer step (healthy: copied before, not recorded; run again, recorded, only after a "
        "non-finite update):",
        "",
        "| model | copied | copy (ms) | opt.step() unrecorded / recorded (ms) | watched step (ms) |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {name} | {mib:.1f} MiB | {c * 1e3:.2f} ({c / w:.1%} of a step) | "
            f"{u * 1e3:.2f} / {rec * 1e3:.2f} | {w * 1e3:.1f} |"
            for name, mib, c, u, rec, w in copies_at_step
        ),
        "",
        "Target: `nanscope run` <= 1.2x a plain step.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
