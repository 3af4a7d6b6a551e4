"""Throughput of `nanscope data`: the fused statistics kernels, the .npy audit end to end, image folders.

Compares, on the same float32 bytes, the physical limits (one read: `x.sum()`; one copy:
`np.copyto`), numpy's separate passes, `array_stats` (whole-array kernel) and `row_stats` (the
per-row kernel the audit uses: per-channel and per-sample statistics in one pass), then times
`nanscope.data.audit` on an .npy file (page cache warm, and cold-ish: evicted with
posix_fadvise(DONTNEED), beside a plain sequential read() of the cold file), and on a folder
of JPEGs against PIL decoding alone. GB per CPU-second (all threads and worker processes)
says what the work costs when a core is not shared with other work.

With `--before-src DIR` (an older `src/` tree, e.g. `git archive 07115ac src | tar -x -C DIR`)
the end-to-end audits also run from that tree, interleaved with the current one, each in its
own process. With `--profile`, a pyinstrument summary (flat, own time) of both audits follows.

Usage: python bench/data_throughput.py [--mib 512] [--before-src /tmp/old/src] [--profile]
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

import numpy as np

from nanscope.core.stats import array_stats, row_stats

_TIMER = """
import json, resource, sys, time
from nanscope.data import audit
path, workers, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if workers == 0:  # PIL decoding alone, one thread: Image.open + np.asarray of every file
    from pathlib import Path
    import numpy as np
    from PIL import Image
    files = sorted(Path(path).glob("*/*"))  # images/ (and masks/): every file decoded once
    def audit(path, workers, progress):
        for f in files:
            with Image.open(f) as im:
                np.asarray(im)
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
audit(path, workers=workers, progress=False)  # warm-up: imports, page cache
out = []
for _ in range(repeat):
    c0, t0 = cpu(), time.perf_counter()
    audit(path, workers=workers, progress=False)
    out.append((time.perf_counter() - t0, cpu() - c0))
print(json.dumps(out))
"""

_PROFILE = """
import sys
from pyinstrument import Profiler
from nanscope.data import audit
audit(sys.argv[1], workers=int(sys.argv[2]), progress=False)
p = Profiler(interval=0.0005)
p.start()
for _ in range(3):
    audit(sys.argv[1], workers=int(sys.argv[2]), progress=False)
p.stop()
sys.stderr.write(p.output_text(unicode=False, color=False, flat=True))
"""


def _times(fn, repeat: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def _numpy_separate(x: np.ndarray) -> tuple:
    return (x.min(), x.max(), x.mean(), x.std(), int(np.isnan(x).sum()), int(np.isinf(x).sum()))


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _subprocess_times(
    src: str | None, path: str, workers: int, repeat: int
) -> list[tuple[float, float]]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    p = subprocess.run(
        [sys.executable, "-c", _TIMER, path, str(workers), str(repeat)],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return [tuple(t) for t in json.loads(p.stdout)]


def _profile(src: str | None, path: str, workers: int, top: int) -> str:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    p = subprocess.run(
        [sys.executable, "-c", _PROFILE, path, str(workers)],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    head = [ln.strip(" /_\\'") for ln in lines if "Duration" in ln]
    body = [ln for ln in lines if ln.lstrip()[:1].isdigit()][:top]
    return "\n".join(head + body) if body else p.stderr[-1500:]


def _med(ts: list[tuple[float, float]], size: float) -> tuple[float, float, float]:
    """(best, median) of size / wall, and size / least CPU time."""
    walls = sorted(t for t, _ in ts)
    return size / walls[0], size / statistics.median(walls), size / min(c for _, c in ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of the end-to-end audits"
    )
    ap.add_argument(
        "--images",
        default="300,1200",
        help="folder sizes (comma-separated): worker processes cost a fixed ~0.05-0.1 s to start and stop",
    )
    ap.add_argument(
        "--before-src",
        default=None,
        help="an older src/ tree to compare the end-to-end audits with",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="append pyinstrument summaries (pip install pyinstrument)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.md"))
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = ap.parse_args()

    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    n = args.mib * (1 << 20) // 4
    x = rng.standard_normal(n, dtype=np.float32)
    gb = x.nbytes / 1e9
    rows = []

    def add(name: str, fn, repeat: int = args.repeat) -> None:
        best, median, cpu = _med(_times(fn, repeat), gb)
        rows.append((name, best, median, cpu))
        print(
            f"{name:62s} best {best:6.2f} GB/s, median {median:6.2f} GB/s, {cpu:6.2f} GB per CPU-second",
            flush=True,
        )

    dst = np.empty_like(x)
    add("x.sum() (one read of the bytes: memory read speed, one core)", x.sum)
    add("np.copyto(y, x) (one read + one write of the bytes)", lambda: np.copyto(dst, x))
    dst = None  # free the copy's 512 MiB before the next rows
    add(
        "numpy separate min/max/mean/std/isnan/isinf",
        lambda: _numpy_separate(x),
        max(1, args.repeat // 2),
    )
    add("array_stats, 1 thread", lambda: array_stats(x, workers=1))
    add("array_stats, 2 threads (default)", lambda: array_stats(x, workers=2))
    images = x[: n // 3072 * 3072].reshape(-1, 3, 1024)
    add(
        "row_stats (N, 3, 1024): per sample and channel, 1 thread",
        lambda: row_stats(images, workers=1),
    )
    add(
        "row_stats (N, 3, 1024): per sample and channel, 2 threads",
        lambda: row_stats(images, workers=2),
    )
    with_nan = x.copy()
    with_nan[:: 1 << 20] = np.nan  # one NaN per 4 MiB: 1 block in 8 takes the slow masked path
    add("array_stats, 2 threads, NaN in 1 of 8 blocks", lambda: array_stats(with_nan, workers=2))
    with_nan = None
    pixels = (x * 40 + 120).astype(np.float32)  # image-like: large mean, small spread
    add("array_stats, 2 threads, mean 120 std 40", lambda: array_stats(pixels, workers=2))
    pixels = None

    from PIL import Image

    e2e: dict[tuple[str, str], list[tuple[float, float]]] = {}
    profiles: dict[str, str] = {}
    trees = [("current", None)] + ([("before", args.before_src)] if args.before_src else [])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        np.save(path, images.reshape(-1, 3, 32, 32))
        size = os.path.getsize(path) / 1e9
        counts = [int(c) for c in args.images.split(",")]
        roots = {}
        made = 0
        for count in counts:  # the larger folders repeat the smaller one's files under new names
            folder = Path(tmp) / f"imgs{count}" / "images"
            folder.mkdir(parents=True)
            for i in range(count):
                if i >= made:
                    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
                        Path(tmp) / f"{i:05d}.jpg", quality=90
                    )
                    made += 1
                os.link(Path(tmp) / f"{i % made:05d}.jpg", folder / f"{i:05d}.jpg")
            roots[count] = folder.parent
        seg = Path(tmp) / "seg"  # images/ + masks/: the masks' checks run in the workers too
        (seg / "masks").mkdir(parents=True)
        os.symlink(roots[counts[0]] / "images", seg / "images")
        for f in sorted((seg / "images").iterdir()):
            Image.fromarray(rng.integers(0, 21, (256, 256), dtype=np.uint8)).save(
                seg / "masks" / f"{f.stem}.png"
            )
        seg_pairs = len(list((seg / "masks").iterdir()))
        x = images = None  # the audits read the file, not these

        def cold_read() -> None:
            _evict(path)
            with open(path, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass

        for r in range(args.rounds):
            for count, root in roots.items():  # the same process structure as the audits below
                e2e.setdefault(
                    (
                        f"PIL decode alone (Image.open + np.asarray), 1 thread, folder of {count}",
                        f"img{count}",
                    ),
                    [],
                ).extend(_subprocess_times(None, str(root), 0, 1))
            e2e.setdefault(
                (f"PIL decode alone, 1 thread, {seg_pairs} image/mask pairs", f"img{seg_pairs}"), []
            ).extend(_subprocess_times(None, str(seg), 0, 1))
            for label, src in trees:
                for workers in (1, 2):
                    e2e.setdefault(
                        (
                            f"{label}: audit(x.npy), {workers} worker{'s' if workers > 1 else ''}, warm",
                            "npy",
                        ),
                        [],
                    ).extend(_subprocess_times(src, path, workers, max(2, args.repeat // 2)))
                    for count, root in roots.items():
                        e2e.setdefault(
                            (
                                f"{label}: audit(folder of {count}), {workers} worker{'s' if workers > 1 else ''}",
                                f"img{count}",
                            ),
                            [],
                        ).extend(_subprocess_times(src, str(root), workers, 1))
                    e2e.setdefault(
                        (
                            f"{label}: audit({seg_pairs} image/mask pairs), "
                            f"{workers} worker{'s' if workers > 1 else ''}",
                            f"img{seg_pairs}",
                        ),
                        [],
                    ).extend(_subprocess_times(src, str(seg), workers, 1))
                cold = [_cold_audit(src, path) for _ in range(2)]
                e2e.setdefault(
                    (f"{label}: audit(x.npy), 2 workers, cold-ish (evicted)", "npy"), []
                ).extend(cold)
            e2e.setdefault(("sequential read() of the cold file (disk limit)", "npy"), []).extend(
                _times(cold_read, 1)
            )
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        if args.profile:
            for label, src in trees:
                # one worker: the main thread does all the work, so the profile sees all of it
                profiles[f"{label}: audit(x.npy), 1 worker"] = _profile(src, path, 1, 12)
                profiles[f"{label}: audit(folder of {counts[0]}), 1 worker"] = _profile(
                    src, str(roots[counts[0]]), 1, 10
                )
    load_after = os.getloadavg()

    npy_rows, img_rows = [], []
    for (name, kind), ts in e2e.items():
        if kind == "npy":
            best, median, cpu = _med(ts, size)
            npy_rows.append(f"| {name} | {best:.2f} | {median:.2f} | {cpu:.2f} |")
        else:
            best, median, cpu = _med(ts, int(kind[3:]))
            img_rows.append(f"| {name} | {best:.0f} | {median:.0f} | {cpu:.0f} |")
        print(npy_rows[-1] if kind == "npy" else img_rows[-1])

    lines = [
        "# data_throughput: fused statistics, the .npy audit end to end, image folders",
        "",
        f"Machine: 2-core CPU VM ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, 2 MiB L2 per core, "
        f"32 MiB L3, no GPU), shared with other work; date {args.date}; numpy {np.__version__}; array {args.mib} MiB "
        f"float32, {args.repeat} runs each; load average (1, 5, 15 min) {', '.join(f'{v:.2f}' for v in load_before)} "
        f"before, {', '.join(f'{v:.2f}' for v in load_after)} after (with a load near 2 the second core is mostly "
        "someone else's: GB per CPU-second is then the fairer number).",
        "",
        "Wall-clock GB/s (best and median of the runs), and GB per CPU-second: bytes over the CPU time",
        "of all the process's threads (and worker processes), the speed of cores not shared with other work.",
        "",
        "| what | best GB/s | median GB/s | GB per CPU-second |",
        "| --- | ---: | ---: | ---: |",
        *[
            f"| {name} | {best:.2f} | {median:.2f} | {cpu:.2f} |"
            for name, best, median, cpu in rows
        ],
        "",
        f"End to end, `nanscope.data.audit` in its own process per measurement, {args.rounds} interleaved rounds: "
        f"an .npy of {size * 1e3:.0f} MB, (N, 3, 32, 32) float32 (target: >= 4 GB/s, page cache warm).",
        "",
        "| what | best GB/s | median GB/s | GB per CPU-second |",
        "| --- | ---: | ---: | ---: |",
        *npy_rows,
        "",
        f"Image folders of {args.images} JPEG files of 256x256x3 (random pixels, quality 90); images per CPU-second "
        "count the worker processes too (target: >= 90 % of PIL's decoding speed per worker, "
        "and 2 workers faster than 1):",
        "",
        "| what | best images/s | median images/s | images per CPU-second |",
        "| --- | ---: | ---: | ---: |",
        *img_rows,
        "",
    ]
    if profiles:
        lines += [
            "## Where the time goes (pyinstrument, flat: own time per function, main thread only)",
            "",
        ]
        for label, text in profiles.items():
            lines += [f"{label}:", "", "```", text, "```", ""]
    lines += [
        "Reproduce: `.venv/bin/python bench/data_throughput.py [--before-src DIR] [--profile]`",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


def _cold_audit(src: str | None, path: str) -> tuple[float, float]:
    """One audit of a file just evicted from the page cache, in a fresh process (imports warm)."""
    code = _TIMER.replace(
        "audit(path, workers=workers, progress=False)  # warm-up: imports, page cache",
        "import os; fd = os.open(path, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)",
    )
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    p = subprocess.run(
        [sys.executable, "-c", code, path, "2", "1"], capture_output=True, text=True, env=env
    )
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return tuple(json.loads(p.stdout)[0])


if __name__ == "__main__":
    main()
