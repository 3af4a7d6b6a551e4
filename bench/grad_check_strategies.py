"""Where should the Guard's per-step NaN/Inf check read the gradients? (issue 13, item 3)

Standalone (nanscope's src/ is not imported for the strategies: each is written out here, the
way guard.py's _check_local would run it), one process, 1 torch thread, strategies interleaved
in shuffled order round by round after a warm-up; every step timed with the CPU clock
(time.process_time, the main figure on a shared machine) and the wall clock. Every strategy
checks the same tensors: the loss, every gradient and the normalization buffers (BatchNorm
running mean/var), as today's Guard does on a step without the weights.

    plain          zero_grad(set_to_none) + forward + loss + backward + optimizer.step
    fused          today's check: one _foreach_norm([loss, *grads, *buffers]) + stack + .tolist()
                   before optimizer.step (skipped when a value is non-finite)
    hook slots     a post-accumulate-grad hook per parameter writes vector_norm(p.grad) into its
                   own slot of one preallocated tensor (out=, no sync) while backward runs; after
                   backward one _foreach_norm over the buffers and the loss into the tail; one
                   .tolist() of the whole tensor
    hook list      the hook appends vector_norm(p.grad) to a list; one stack + .tolist() after
    hook acc       the hook adds norm**2 into one device scalar (addcmul_, no sync); after
                   backward [sum of squares, loss, *buffer norms] in one stack + .tolist()
    plain fusedopt the plain step with SGD(fused=True) (the baseline of the next one)
    amp found_inf  "fused into the optimizer": _amp_foreach_non_finite_check_and_unscale_ sets a
                   device flag, the fused optimizer kernel reads it and skips the update itself
                   (no sync before the step); the flag is read after the step (one .item())

Correctness is checked for every strategy before timing: a healthy step is not flagged and
updates the weights; a step with a NaN in the input batch is flagged and leaves the weights and
the optimizer state bit-identical. Then a profile of today's fused pass on the ResNet-50 grads
(memory read vs per-tensor dispatch vs stack/tolist) and this machine's read bandwidth.

Usage: python bench/grad_check_strategies.py [--scale F] [--out bench/results/grad_check_strategies.md]
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import os
import platform
import random
import statistics
import sys
import time
from contextlib import redirect_stdout

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
F32 = torch.float32


from guard_overhead import resnet50, small_cnn  # the same models as the Guard's bench  # noqa: E402


class Setup:
    def __init__(self, make, batch_shape, optim: str, seed=0):
        torch.manual_seed(seed)
        self.model = make()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.buffers = [
            b
            for m in self.model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase)
            for b in m.buffers(recurse=False)
            if b.is_floating_point()
        ]
        if optim == "sgd":
            self.opt = torch.optim.SGD(self.params, lr=1e-3, momentum=0.9)
            self.opt_fused = torch.optim.SGD(self.params, lr=1e-3, momentum=0.9, fused=True)
        else:
            self.opt = torch.optim.Adam(self.params, lr=1e-4)
            self.opt_fused = torch.optim.Adam(self.params, lr=1e-4, fused=True)
        g = torch.Generator().manual_seed(seed)
        n = batch_shape[0]
        self.batch = (
            torch.randn(*batch_shape, generator=g),
            torch.randint(0, 10, (n,), generator=g),
        )
        x = self.batch[0].clone()
        x.view(-1)[x.numel() // 3] = float("nan")  # one NaN pixel -> NaN loss and gradients
        self.bad_batch = (x, self.batch[1])

    def forward_backward(self, batch):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss


# -- the strategies --------------------------------------------------------------------------
class Plain:
    name = "plain"
    syncs = 0
    baseline = "plain"
    fused_opt = False

    def __init__(self, s: Setup):
        self.s = s
        self.opt = s.opt_fused if self.fused_opt else s.opt

    def enter(self):  # outside the timed steps (a Guard would do this once, at construction)
        pass

    def exit(self):
        pass

    def before(self):
        pass

    def check(self, loss) -> bool:
        return False

    def step(self, batch) -> bool:
        self.opt.zero_grad(set_to_none=True)
        self.before()
        loss = self.s.forward_backward(batch)
        bad = self.check(loss)
        if not bad:
            self.opt.step()
        return bad


def finite(values) -> bool:
    return all(map(math.isfinite, values))


class Fused(Plain):
    name = "fused"
    syncs = 1

    def check(self, loss):
        loss_t = loss.detach()
        grads = [p.grad for p in self.s.params if p.grad is not None]
        norms = list(torch._foreach_norm([loss_t, *grads, *self.s.buffers], 2, dtype=F32))
        norms.append(loss_t.float().sum())
        return not finite(torch.stack(norms).tolist())


class _Hooked(Plain):
    def hook(self, i):
        raise NotImplementedError

    def enter(self):
        self.handles = [
            p.register_post_accumulate_grad_hook(self.hook(i)) for i, p in enumerate(self.s.params)
        ]

    def exit(self):
        for h in self.handles:
            h.remove()


class HookSlots(_Hooked):
    name = "hook slots"
    syncs = 1

    def __init__(self, s):
        super().__init__(s)
        n = len(s.params)
        self.buf = torch.zeros(n + len(s.buffers) + 1, dtype=F32)
        self.slots = list(self.buf.unbind())
        self.tail = self.buf[n:]

    def hook(self, i):
        slot = self.slots[i]

        def fn(p):
            torch.linalg.vector_norm(p.grad, dtype=F32, out=slot)

        return fn

    def before(self):
        self.buf.zero_()  # a parameter without a gradient this step keeps 0

    def check(self, loss):
        loss_t = loss.detach()
        torch.stack(
            [*torch._foreach_norm(self.s.buffers, 2, dtype=F32), loss_t.float()], out=self.tail
        )
        return not finite(self.buf.tolist())


class HookList(_Hooked):
    name = "hook list"
    syncs = 1

    def hook(self, i):
        def fn(p):
            self.norms.append(torch.linalg.vector_norm(p.grad, dtype=F32))

        return fn

    def before(self):
        self.norms = []

    def check(self, loss):
        loss_t = loss.detach()
        norms = self.norms + list(torch._foreach_norm(self.s.buffers, 2, dtype=F32))
        norms.append(loss_t.float())
        return not finite(torch.stack(norms).tolist())


class HookAcc(_Hooked):
    name = "hook acc"
    syncs = 1

    def __init__(self, s):
        super().__init__(s)
        self.acc = torch.zeros((), dtype=F32)

    def hook(self, i):
        acc = self.acc

        def fn(p):
            n = torch.linalg.vector_norm(p.grad, dtype=F32)
            acc.addcmul_(n, n)  # sum of squares: Inf past a total norm of ~1.8e19 (then re-check)

        return fn

    def before(self):
        self.acc.zero_()

    def check(self, loss):
        loss_t = loss.detach()
        bn = torch._foreach_norm(self.s.buffers, 2, dtype=F32)
        return not finite(torch.stack([self.acc, loss_t.float(), *bn]).tolist())


class PlainFusedOpt(Plain):
    name = "plain fusedopt"
    fused_opt = True


class AmpFoundInf(Plain):
    name = "amp found_inf"
    syncs = 1
    baseline = "plain fusedopt"
    fused_opt = True

    def __init__(self, s):
        super().__init__(s)
        self.found_inf = torch.zeros((), dtype=F32)
        self.one = torch.ones((), dtype=F32)

    def step(self, batch):
        self.opt.zero_grad(set_to_none=True)
        loss = self.s.forward_backward(batch)
        self.found_inf.zero_()
        grads = [p.grad for p in self.s.params if p.grad is not None]
        # reads and rewrites (x * 1.0, bit-identical) every tensor; sets found_inf, no sync
        torch._amp_foreach_non_finite_check_and_unscale_(
            [loss.detach().reshape(1), *grads, *self.s.buffers], self.found_inf, self.one
        )
        self.opt.found_inf = self.found_inf  # the fused kernel skips the update when it is 1
        try:
            self.opt.step()
        finally:
            del self.opt.found_inf
        return bool(self.found_inf.item())  # the one sync, after the step


SGD_MODES = [Plain, Fused, HookSlots, HookList, HookAcc, PlainFusedOpt, AmpFoundInf]


# -- correctness -----------------------------------------------------------------------------
def state_of(s: Setup, opt):
    out = [p.detach().clone() for p in s.params]
    for st in opt.state.values():
        out += [v.clone() for v in st.values() if isinstance(v, torch.Tensor)]
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape
        and torch.equal(x.view(-1).view(torch.int32), y.view(-1).view(torch.int32))
        for x, y in zip(a, b, strict=True)
    )


def verify(s: Setup, mode) -> str:
    if mode.syncs == 0:
        return "no check"
    saved = copy.deepcopy(s.model.state_dict())
    saved_opt = [copy.deepcopy(o.state_dict()) for o in (s.opt, s.opt_fused)]
    mode.enter()
    try:
        before = state_of(s, mode.opt)
        assert mode.step(s.batch) is False, f"{mode.name}: healthy step flagged"
        after = state_of(s, mode.opt)
        assert not same(before, after), f"{mode.name}: healthy step not applied"
        snap = [b.clone() for b in s.buffers]
        assert mode.step(s.bad_batch) is True, f"{mode.name}: NaN step not flagged"
        assert any(not bool(torch.isfinite(p.grad).all()) for p in s.params)
        assert same(after, state_of(s, mode.opt)), f"{mode.name}: NaN step changed the state"
        with torch.no_grad():  # the Guard puts the pre-step BatchNorm statistics back
            torch._foreach_copy_(s.buffers, snap)
        assert mode.step(s.batch) is False, f"{mode.name}: healthy step after a NaN flagged"
    finally:
        mode.exit()
        s.model.load_state_dict(saved)  # BatchNorm statistics took the NaN: put them back
        for o, sd in zip((s.opt, s.opt_fused), saved_opt, strict=True):
            o.load_state_dict(sd)
    return "ok"


# -- timing ----------------------------------------------------------------------------------
def run_steps(mode, batch, n):
    out = []
    mode.enter()
    try:
        for _ in range(n):
            c0, w0 = time.process_time(), time.perf_counter()
            mode.step(batch)
            out.append((time.process_time() - c0, time.perf_counter() - w0))
    finally:
        mode.exit()
    return out


def pct(v, q):
    v = sorted(v)
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def bench_config(name, make, batch_shape, optim, mode_classes, rounds, steps, warmup):
    s = Setup(make, batch_shape, optim)
    modes = [cls(s) for cls in mode_classes]
    checks = {m.name: verify(s, m) for m in modes}
    for m in modes:
        run_steps(m, s.batch, warmup)
    samples = {m.name: [] for m in modes}
    per_round = {m.name: [] for m in modes}  # mean CPU time per round (paired ratios)
    rng = random.Random(0)
    t0 = time.perf_counter()
    for _ in range(rounds):
        order = modes[:]
        rng.shuffle(order)
        for m in order:
            r = run_steps(m, s.batch, steps)
            samples[m.name] += r
            per_round[m.name].append(statistics.fmean(c for c, _ in r))
    rows = []
    for m in modes:
        cpu = statistics.median(c for c, _ in samples[m.name])
        wall = statistics.median(w for _, w in samples[m.name])
        base = samples[m.baseline]
        bcpu = statistics.median(c for c, _ in base)
        bwall = statistics.median(w for _, w in base)
        ratios = [a / b for a, b in zip(per_round[m.name], per_round[m.baseline], strict=True)]
        rows.append(
            {
                "mode": m.name,
                "baseline": m.baseline,
                "cpu": cpu,
                "wall": wall,
                "ratio_cpu": cpu / bcpu,
                "ratio_wall": wall / bwall,
                "own": cpu - bcpu,
                "r_med": statistics.median(ratios),
                "r_lo": pct(ratios, 0.25),
                "r_hi": pct(ratios, 0.75),
                "syncs": m.syncs,
                "n": len(samples[m.name]),
                "check": checks[m.name],
            }
        )
    return {
        "name": name,
        "batch": "x".join(map(str, batch_shape)),
        "optim": optim,
        "params": sum(p.numel() for p in s.params),
        "ntensors": (len(s.params), len(s.buffers)),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "setup": s,
    }


# -- profile of today's fused pass -----------------------------------------------------------
def best_of(fn, n=20):  # CPU clock: a neighbour taking the core does not count
    best = float("inf")
    for _ in range(n):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def bandwidth():
    big = torch.ones(128 * 1024 * 1024 // 4 * 4, dtype=F32)  # 512 MiB
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t = best_of(big.sum, n=6)
        out[threads] = big.numel() * 4 / t / 1e9
    torch.set_num_threads(1)
    return out, big


def profile_fused(s: Setup, big: torch.Tensor):
    s.opt.zero_grad(set_to_none=True)
    loss = s.forward_backward(s.batch).detach()
    grads = [p.grad for p in s.params]
    tensors = [loss, *grads, *s.buffers]

    def fused():
        norms = list(torch._foreach_norm(tensors, 2, dtype=F32))
        norms.append(loss.float().sum())
        return torch.stack(norms).tolist()

    norms = list(torch._foreach_norm(tensors, 2, dtype=F32)) + [loss.float().sum()]
    tiny = [torch.ones(1) for _ in tensors]
    flat = torch.cat([g.reshape(-1) for g in grads])

    def flush():
        big.sum()

    def cold(fn):
        def run():
            flush()
            t0 = time.process_time()
            fn()
            return time.process_time() - t0

        return min(run() for _ in range(8))

    def warm_each():  # what a hook sees: each gradient read right after it was written
        total = 0.0
        for g in grads:
            g.mul_(1.0)  # rewrite it (bit-identical): its lines are in cache now
            t0 = time.process_time()
            torch.linalg.vector_norm(g, dtype=F32)
            total += time.process_time() - t0
        return total

    def warm():
        flush()
        return warm_each()

    p = {
        "fused (whole check)": best_of(fused),
        "_foreach_norm over all tensors": best_of(
            lambda: torch._foreach_norm(tensors, 2, dtype=F32)
        ),
        "_foreach_norm, grads only": best_of(lambda: torch._foreach_norm(grads, 2, dtype=F32)),
        "_foreach_norm, buffers only": best_of(
            lambda: torch._foreach_norm(s.buffers, 2, dtype=F32)
        ),
        "stack + .tolist()": best_of(lambda: torch.stack(norms).tolist()),
        "_foreach_norm on as many 1-element tensors (dispatch only)": best_of(
            lambda: torch._foreach_norm(tiny, 2, dtype=F32)
        ),
        "Python loop of vector_norm on 1-element tensors (per-op cost, hooks)": best_of(
            lambda: [torch.linalg.vector_norm(t, dtype=F32) for t in tiny]
        ),
        "vector_norm of all grads as one flat tensor (read only)": best_of(
            lambda: torch.linalg.vector_norm(flat, dtype=F32)
        ),
        "vector_norm per gradient, each right after it was written (as in a hook)": min(
            warm() for _ in range(8)
        ),
        "_foreach_norm, grads only, caches flushed first": cold(
            lambda: torch._foreach_norm(grads, 2, dtype=F32)
        ),
    }
    prof_text = io.StringIO()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            fused()
    with redirect_stdout(prof_text):
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return p, prof_text.getvalue(), sum(g.numel() for g in grads) * 4, len(tensors)


# -- report ----------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(results, prof, bw, args) -> str:
    times, prof_table, grad_bytes, ntensors = prof
    lines = [
        "# Gradient-check strategies for the Guard (bench/grad_check_strategies.py)",
        "",
        f"Machine: 2-core VM ({cpu_name()}, {os.cpu_count()} logical CPUs), no GPU; torch "
        f"{torch.__version__}, Python {platform.python_version()}, 1 torch thread. "
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Load average (1/5/15 min) at start / end: {args.load_start} / {args.load_end} (the 2 cores "
        "were shared with other engineers' test runs).",
        f"Command: `{args.command}`. Total run time {args.total:.0f} s.",
        f"Memory read bandwidth (sum over a 512 MiB float32 tensor, best of 6): {bw[1]:.1f} GB/s with "
        f"1 thread, {bw[2]:.1f} GB/s with 2 threads.",
        "",
        "Method: strategies interleaved in shuffled order round by round after a warm-up, the same "
        "model, batch and weights for all; per-step CPU time (process_time, the main figure) and "
        "wall time, medians over all timed steps. Ratio = median / median of the baseline "
        "(plain, or plain with the fused optimizer for the found_inf strategy); spread = the "
        "25th-75th percentile of the per-round paired ratios (CPU). Own work = median CPU step "
        "minus the baseline's median CPU step. Syncs = host synchronizations per step (.tolist / "
        ".item). Every strategy checks loss + all gradients + BatchNorm buffers; correctness "
        "(healthy step not flagged and applied; NaN-input step flagged, weights and optimizer state "
        "bit-identical) verified for each before timing.",
        "",
        "| model | batch | optimizer | strategy | CPU median | wall median | ratio CPU (wall) | "
        "per-round ratio, p25-p75 | own work (CPU) | syncs | steps | check |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        for row in r["rows"]:
            base = "" if row["baseline"] == "plain" else f" vs {row['baseline']}"
            ratio = (
                "1 (baseline)"
                if row["mode"] == row["baseline"]
                else f"{row['ratio_cpu']:.3f}x ({row['ratio_wall']:.3f}x){base}"
            )
            spread = (
                "" if row["mode"] == row["baseline"] else f"{row['r_lo']:.3f}-{row['r_hi']:.3f}"
            )
            own = "" if row["mode"] == row["baseline"] else f"{row['own'] * 1e3:+.2f} ms"
            lines.append(
                f"| {r['name']} | {r['batch']} | {r['optim']} | {row['mode']} | "
                f"{row['cpu'] * 1e3:.1f} ms | {row['wall'] * 1e3:.1f} ms | {ratio} | {spread} | "
                f"{own} | {row['syncs']} | {row['n']} | {row['check']} |"
            )
    lines += [
        "",
        "Configurations: "
        + "; ".join(
            f"{r['name']} {r['batch']} {r['optim']}: {r['params'] / 1e6:.2f} M parameters in "
            f"{r['ntensors'][0]} tensors + {r['ntensors'][1]} BatchNorm buffers, "
            f"{r['seconds']:.0f} s timed"
            for r in results
        )
        + ".",
        "",
        f"## Profile: today's fused pass on the ResNet-50 gradients ({grad_bytes / 1e6:.0f} MB of "
        f"gradients, {ntensors} tensors with the loss and buffers), 1 thread, best of 20 (CPU clock)",
        "",
        "| what | time | as bandwidth |",
        "| --- | ---: | ---: |",
    ]
    for k, v in times.items():
        gbs = f"{grad_bytes / v / 1e9:.1f} GB/s" if "grads" in k or "whole" in k else ""
        lines.append(f"| {k} | {v * 1e3:.3f} ms | {gbs} |")
    lines += ["", "torch.profiler, 10 fused checks:", "", "```", prof_table.strip(), "```", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every round count")
    ap.add_argument("--only", default=None, help="comma list: cnn,r64,r224,adam")
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "grad_check_strategies.md"),
    )
    args = ap.parse_args(argv)
    args.command = "python bench/grad_check_strategies.py" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    args.load_start = load()
    start = time.perf_counter()
    bw, big = bandwidth()

    def r(n):
        return max(2, round(n * args.scale))

    configs = {
        "cnn": ("small CNN", small_cnn, (32, 3, 32, 32), "sgd", SGD_MODES, r(30), 8, 5),
        "r64": ("ResNet-50", resnet50, (8, 3, 64, 64), "sgd", SGD_MODES, r(24), 3, 2),
        "r224": (
            "ResNet-50",
            resnet50,
            (2, 3, 224, 224),
            "sgd",
            [Plain, Fused, HookSlots, HookAcc, PlainFusedOpt, AmpFoundInf],
            r(12),
            2,
            1,
        ),
        "adam": (
            "ResNet-50",
            resnet50,
            (8, 3, 64, 64),
            "adam",
            [Plain, Fused, HookSlots, PlainFusedOpt, AmpFoundInf],
            r(10),
            3,
            2,
        ),
    }
    wanted = args.only.split(",") if args.only else list(configs)
    results = []
    for key in wanted:
        res = bench_config(*configs[key])
        print(f"{key}: {res['seconds']:.0f} s, load {load()}", file=sys.stderr, flush=True)
        results.append(res)
    prof_setup = next(
        (x["setup"] for x in results if x["name"] == "ResNet-50" and x["batch"] == "8x3x64x64"),
        None,
    ) or Setup(resnet50, (8, 3, 64, 64), "sgd")
    prof = profile_fused(prof_setup, big)
    args.load_end = load()
    args.total = time.perf_counter() - start
    text = report(results, prof, bw, args)
    print(text)
    if args.out != "-":
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
