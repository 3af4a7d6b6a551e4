"""What does nanscope.torch.Guard cost on a healthy DDP step, at 2 and 4 gloo processes?

Each world size runs in its own process group (one process per rank, CPU, gloo on
localhost). In one run, interleaved round by round (the order of the two modes is drawn per
round, the same on every rank), after a warm-up:

    plain   a DDP model nanscope never touched: zero_grad + forward + loss + backward (DDP's
            gradient all-reduce) + optimizer.step
    guard   a second DDP model with the same weights, the same step through
            Guard(policy="skip").step

Reported: the median step time of each mode on rank 0 (collectives make the ranks wait for
each other, so rank 0's time is the step's), their ratio, the collectives per guarded step
(``torch.distributed.all_reduce`` calls, counted with their sizes: under the guard DDP's
gradient buckets are all-reduced by its comm hook in Python, so they are counted too, and
the flag is the ``world_size`` extra floats one of them carries), and the final weights of
both models compared (bit for bit). The machine is shared: its load average is written next
to the numbers.

Usage: python bench/distributed_overhead.py [--rounds N] [--steps N] [--worlds 2,4] [--models mlp,cnn]
       [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


# name -> (model, input shape of one rank's batch, what the table calls it)
MODELS = {
    "mlp": (mlp, (64, 256), "MLP 256-512-512-10, batch 64 per rank"),
    "cnn": (
        None,  # bench/guard_overhead.small_cnn: 3 conv + BatchNorm layers, 24k parameters
        (32, 3, 32, 32),
        "guard_overhead.py's small CNN (3 conv + BatchNorm, 24k parameters), batch 32x3x32x32 per rank",
    ),
}


def _make(name: str) -> nn.Module:
    if name == "cnn":
        sys.path.insert(0, str(Path(__file__).parent))
        from guard_overhead import small_cnn

        return small_cnn()
    return MODELS[name][0]()


def worker(
    rank: int, world: int, port: int, rounds: int, steps: int, out: str, model_name: str = "mlp"
) -> None:
    from nanscope.torch import Guard

    warnings.simplefilter("ignore")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    torch.set_num_threads(1)

    def build():
        torch.manual_seed(0)
        return DDP(_make(model_name))

    plain_model, model = build(), build()
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    data = [
        (
            torch.randn(*MODELS[model_name][1], generator=g),
            torch.randint(0, 10, (MODELS[model_name][1][0],), generator=g),
        )
        for _ in range(8)
    ]

    def train_step(batch, model=model):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def plain(batch):
        plain_opt.zero_grad(set_to_none=True)
        train_step(batch, plain_model)
        plain_opt.step()

    guard = Guard(model, opt, policy="skip", reports=None)
    calls: list[int] = []  # sizes of the all_reduce calls
    real_all_reduce = dist.all_reduce

    def counting(tensor, *a, **k):
        calls.append(tensor.numel())
        return real_all_reduce(tensor, *a, **k)

    dist.all_reduce = counting
    modes = {"plain": plain, "guard": lambda b: guard.step(train_step, b)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}  # this process's CPU time (not waits)
    order = random.Random(0)  # the same draw on every rank: the modes stay matched
    for r in range(rounds + 1):
        for name in order.sample(list(modes), 2):
            fn = modes[name]
            before = len(calls)
            for i in range(steps):
                dist.barrier()
                t, c = time.perf_counter(), time.process_time()
                fn(data[i % len(data)])
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - t)
                    cpu[name].append(time.process_time() - c)
            if name == "guard" and r:
                per_step = calls[before:]
    dist.all_reduce = real_all_reduce
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "times": times,
                    "cpu": cpu,
                    "collectives_per_step": len(per_step) / steps,
                    "sizes": sorted(set(per_step)),
                    "same_weights": all(
                        torch.equal(a, b)
                        for a, b in zip(plain_model.parameters(), model.parameters(), strict=True)
                    ),
                    "skipped": guard.skipped,
                    "disabled": guard.disabled,
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--out", default="bench/results/distributed_overhead.md")
    a = ap.parse_args(argv)
    rows = []
    load_before = os.getloadavg()
    for model_name in a.models.split(","):
        for world in (int(w) for w in a.worlds.split(",")):
            rows.append((model_name, *_measure(model_name, world, a.rounds, a.steps)))
    lines = [
        "# Guard overhead under DDP (gloo, CPU)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}, "
        f"python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Load average (1/5/15 min) before the run: {' / '.join(f'{v:.2f}' for v in load_before)} "
        "(the machine is shared with other engineers' work).",
        "",
        "Models: "
        + "; ".join(f"**{m}**: DDP({MODELS[m][2]})" for m in a.models.split(","))
        + ". SGD with momentum, one thread per rank. "
        f"{a.rounds} rounds x {a.steps} steps per mode, interleaved (order drawn per round), after a "
        "warm-up round; a barrier before every timed step; medians of rank 0's step times.",
        "",
        "| model | processes | plain step | guarded step | ratio (wall) | ratio (rank 0's CPU time) | "
        "all_reduce calls per guarded step (elements) | nanscope's own collectives | same final "
        "weights | timed steps per mode | load after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (
        model_name,
        world,
        plain,
        guard,
        ratio,
        cpu,
        coll,
        n,
        skipped,
        disabled,
        sizes,
        same,
        load,
    ) in rows:
        assert skipped == 0 and not disabled
        own = sum(1 for s in sizes if s <= world)
        lines.append(
            f"| {model_name} | {world} | {plain:.2f} ms | {guard:.2f} ms | **{ratio:.3f}x** | "
            f"{cpu:.3f}x | {coll:.0f} ({', '.join(map(str, sizes))}) | {own} | "
            f"{'yes' if same else 'NO'} | {n} | {load[0]:.2f} |"
        )
    lines += [
        "",
        "Command: `python bench/distributed_overhead.py` (target: <= 1.02x, one small all_reduce "
        "per step).",
    ]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _measure(model_name: str, world: int, rounds: int, steps: int) -> tuple:
    import socket

    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        res = Path(tmp) / "r.json"
        mp.spawn(
            worker,
            args=(world, port, rounds, steps, str(res), model_name),
            nprocs=world,
            join=True,
        )
        r = json.loads(res.read_text())
    plain, guard = (statistics.median(r["times"][m]) * 1e3 for m in ("plain", "guard"))
    cpu_plain, cpu_guard = (statistics.median(r["cpu"][m]) * 1e3 for m in ("plain", "guard"))
    print(
        f"{model_name}, world {world}: plain {plain:.2f} ms, guard {guard:.2f} ms, ratio "
        f"{guard / plain:.3f}, CPU-time ratio {cpu_guard / cpu_plain:.3f}, "
        f"{r['collectives_per_step']:.0f} all_reduce(s) per step of sizes {r['sizes']}, "
        f"same weights {r['same_weights']}",
        flush=True,
    )
    return (
        world,
        plain,
        guard,
        guard / plain,
        cpu_guard / cpu_plain,
        r["collectives_per_step"],
        len(r["times"]["plain"]),
        r["skipped"],
        r["disabled"],
        r["sizes"],
        r["same_weights"],
        os.getloadavg(),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
