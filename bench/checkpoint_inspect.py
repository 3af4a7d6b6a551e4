"""Wall time of the whole `nanscope inspect CHECKPOINT` command, as a subprocess, on a ResNet-101.

Builds torchvision's ResNet-101 (weights=None, 44.5 M parameters) once and saves its state dict
as `.pt` (torch.save, zip format) and `.safetensors`; then, interleaved round by round, runs:

    inspect .pt           `python -m nanscope inspect r101.pt`: nanscope's own reader, no torch import
    inspect .pt, torch    the previous reader: `nanscope.torch.audit.read_torch_checkpoint`
                          (import torch + torch.load(weights_only=True)) + the same analysis
    inspect .safetensors  `python -m nanscope inspect r101.safetensors`
    python + numpy        `python -c "import numpy"`: the floor under any of them

each "cold-ish" (the checkpoint evicted from the page cache with posix_fadvise(DONTNEED) just
before; Python, numpy and torch stay cached: a true cold start needs drop_caches, which the
shared VM's other users would feel) and warm (the file read once before). Then a pyinstrument
profile (flat, by own time) of each reader in a fresh process: where the time goes.

Usage: python bench/checkpoint_inspect.py [--rounds 5] [--out bench/results/checkpoint_inspect.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OLD_READER = """
import sys
from nanscope.torch.audit import read_torch_checkpoint
from nanscope.audit.checkpoint import find_norm_layers
from nanscope.audit.inspect import analyze
ck = read_torch_checkpoint(sys.argv[1])
ck.norm_layers = find_norm_layers(ck.tensors)
print(analyze(ck))
"""

PROFILE = """
import sys
from pyinstrument import Profiler
p = Profiler(interval=0.0005)
p.start()
if sys.argv[1] == "torch":
    sys.argv = sys.argv[1:]  # the reader reads its path from sys.argv[1]
    exec(compile({old!r}, "old_reader", "exec"), {{"__name__": "x"}})
else:
    from nanscope.cli.main import main
    main(["inspect", sys.argv[2]])
p.stop()
sys.stdout.flush()
sys.stderr.write(p.output_text(unicode=False, color=False, flat=True))
"""


PHASES = """
import json, sys, time
t0 = time.perf_counter()
if sys.argv[1] == "torch":
    import torch  # noqa: F401
    from nanscope.torch.audit import read_torch_checkpoint as read
else:
    import numpy  # noqa: F401
    from nanscope.audit.torchfile import read_torch_file as read
from nanscope.audit.checkpoint import find_norm_layers
from nanscope.audit.inspect import analyze
t1 = time.perf_counter()
ck = read(sys.argv[2])
ck.norm_layers = find_norm_layers(ck.tensors)
t2 = time.perf_counter()
text = str(analyze(ck))
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "read": t2 - t1, "check and render": t3 - t2}))
"""


def _phases(kind: str, path: Path, rounds: int) -> dict[str, float]:
    got: dict[str, list[float]] = {}
    for _ in range(rounds):
        p = subprocess.run(
            [sys.executable, "-c", PHASES, kind, str(path)], capture_output=True, text=True
        )
        for k, v in json.loads(p.stdout).items():
            got.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in got.items()}


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _warm(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(64 << 20):
            pass


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode not in (0, 1):
        raise SystemExit(f"{cmd} failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    return dt


def _build(folder: Path) -> tuple[Path, Path, int]:
    import torch
    import torchvision

    from nanscope.audit.checkpoint import write_safetensors

    torch.manual_seed(0)
    sd = torchvision.models.resnet101(weights=None).state_dict()
    pt, st = folder / "r101.pt", folder / "r101.safetensors"
    torch.save(sd, pt)
    write_safetensors(st, {k: v.numpy() for k, v in sd.items()})
    return pt, st, sum(v.numel() for v in sd.values())


def _profile(kind: str, path: Path, top: int) -> str:
    p = subprocess.run(
        [sys.executable, "-c", PROFILE.format(old=OLD_READER), kind, str(path)],
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    head = [
        ln for ln in lines if ln.startswith(("Recorded", "Duration", "Program")) or "Duration" in ln
    ]
    body = [ln for ln in lines if ln[:1].isdigit() or ln.lstrip()[:1].isdigit()][:top]
    return "\n".join(head + body) if body else p.stderr[-2000:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "checkpoint_inspect.md")
    )
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = ap.parse_args()

    load_before = os.getloadavg()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        pt, st, numel = _build(Path(tmp))
        modes = {
            "inspect .pt (nanscope's reader, no torch)": (
                [py, "-m", "nanscope", "inspect", str(pt)],
                pt,
            ),
            "inspect .pt via torch.load(weights_only=True) (previous reader)": (
                [py, "-c", OLD_READER, str(pt)],
                pt,
            ),
            "inspect .safetensors": ([py, "-m", "nanscope", "inspect", str(st)], st),
            "python -c 'import numpy' (floor)": ([py, "-c", "import numpy"], pt),
        }
        times: dict[tuple[str, str], list[float]] = {}
        for cmd, _ in modes.values():  # warm-up: Python's own files and .pyc in the page cache
            _run(cmd)
        for r in range(args.rounds):
            for name, (cmd, f) in modes.items():
                for state in ("cold-ish", "warm"):
                    if state == "cold-ish":
                        _evict(f)
                    else:
                        _warm(f)
                    times.setdefault((name, state), []).append(_run(cmd))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        sizes = {"pt": pt.stat().st_size, "st": st.stat().st_size}
        _warm(pt)
        phases = {
            "previous reader (import torch, torch.load(weights_only=True))": _phases(
                "torch", pt, args.rounds
            ),
            "nanscope's reader (import numpy, restricted unpickler + mapped storages)": _phases(
                "nanscope", pt, args.rounds
            ),
        }
        profiles = {}
        try:
            import pyinstrument  # noqa: F401 - a profiler for this report only, not a dependency

            for kind, label in (
                (
                    "torch",
                    "previous reader: import torch + torch.load(weights_only=True) + analysis",
                ),
                ("nanscope", "`nanscope inspect r101.pt` (nanscope's reader)"),
            ):
                _warm(pt)
                profiles[label] = _profile(kind, pt, args.top)
        except ImportError:
            profiles["(pyinstrument not installed)"] = (
                "pip install pyinstrument to add the profiles"
            )
    load_after = os.getloadavg()

    rows = []
    for name in modes:
        for state in ("cold-ish", "warm"):
            ts = times[(name, state)]
            rows.append(
                f"| {name} | {state} | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} |"
            )
    lines = [
        "# checkpoint_inspect: the whole `nanscope inspect` command on a ResNet-101",
        "",
        f"Machine: 2-core CPU VM ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, no GPU), shared with "
        f"other work; date {args.date}; Python {platform.python_version()}; load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.2f}' for x in load_before)} before, {', '.join(f'{x:.2f}' for x in load_after)} after.",
        "",
        f"Checkpoint: torchvision ResNet-101, weights=None, state dict of {numel / 1e6:.1f} M values: "
        f"`.pt` {sizes['pt'] / 1e6:.0f} MB (torch.save, zip), `.safetensors` {sizes['st'] / 1e6:.0f} MB.",
        "",
        "Wall time of the command as a subprocess (Python start included), seconds, "
        f"{args.rounds} interleaved rounds. Cold-ish: the checkpoint evicted from the page cache "
        "(posix_fadvise DONTNEED) right before; Python, numpy and torch stay cached. Target: < 1 s.",
        "",
        "| command | file | median s | min s | max s |",
        "| --- | --- | ---: | ---: | ---: |",
        *rows,
        "",
        "## Where the time goes",
        "",
        "Phases inside one process (medians of the rounds, warm file; Python's own start, ~0.02 s, not included):",
        "",
        "| reader | " + " | ".join(f"{k} s" for k in next(iter(phases.values()))) + " | total s |",
        "| --- |" + " ---: |" * (len(next(iter(phases.values()))) + 1),
        *[
            f"| {name} | "
            + " | ".join(f"{v:.3f}" for v in ph.values())
            + f" | {sum(ph.values()):.3f} |"
            for name, ph in phases.items()
        ],
        "",
        "pyinstrument, flat (own time per function), warm file:",
        "",
    ]
    for label, text in profiles.items():
        lines += [f"{label}:", "", "```", text, "```", ""]
    lines += [
        "Reproduce: `.venv/bin/python bench/checkpoint_inspect.py` (needs torch and torchvision to build the "
        "checkpoint; pyinstrument for the profiles)",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
