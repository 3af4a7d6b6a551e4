"""Throughput of nanscope's fused statistics (min, max, mean, std, NaN and Inf counts).

Compares `nanscope.core.stats.array_stats` (one cache-blocked pass, 1 and 2 threads) with
numpy's separate passes on an in-memory float32 array, and times `nanscope.data.audit` on an
.npy file. Writes bench/results/data_throughput.md.

Usage: python bench/data_throughput.py [--mib 512] [--out bench/results/data_throughput.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from nanscope.core.stats import array_stats


def _times(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return sorted(out)


def _cpu_time(fn, repeat: int) -> float:
    """Least CPU time (all threads) of one call: what the work costs when a core is not shared."""
    best = float("inf")
    for _ in range(repeat):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def _numpy_separate(x: np.ndarray) -> tuple:
    return (x.min(), x.max(), x.mean(), x.std(), int(np.isnan(x).sum()), int(np.isinf(x).sum()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.md"))
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    n = args.mib * (1 << 20) // 4
    x = rng.standard_normal(n, dtype=np.float32)
    gb = x.nbytes / 1e9
    rows = []

    def add(name: str, fn, repeat: int = args.repeat, size: float = gb) -> None:
        ts = _times(fn, repeat)
        cpu = _cpu_time(fn, max(3, repeat // 3))
        rows.append((name, size / ts[0], size / ts[len(ts) // 2], size / cpu))
        print(f"{name:58s} best {size / ts[0]:6.2f} GB/s, median {size / ts[len(ts) // 2]:6.2f} GB/s, "
              f"{size / cpu:6.2f} GB per CPU-second")

    add("x.sum() (memory read speed, one core)", x.sum)
    add("numpy separate min/max/mean/std/isnan/isinf", lambda: _numpy_separate(x), max(1, args.repeat // 2))
    add("array_stats, 1 thread", lambda: array_stats(x, workers=1))
    add("array_stats, 2 threads (default)", lambda: array_stats(x, workers=2))
    with_nan = x.copy()
    with_nan[:: 1 << 20] = np.nan  # one NaN per 4 MiB: 1 block in 8 takes the slow masked path
    add("array_stats, 2 threads, NaN in 1 of 8 blocks", lambda: array_stats(with_nan, workers=2))
    pixels = (x * 40 + 120).astype(np.float32)  # image-like: large mean, small spread
    add("array_stats, 2 threads, mean 120 std 40", lambda: array_stats(pixels, workers=2))

    from nanscope.data import audit

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.npy")
        rows_ = n // 3072
        np.save(path, x[: rows_ * 3072].reshape(rows_, 3, 32, 32))
        size = os.path.getsize(path) / 1e9
        add("nanscope.data.audit(x.npy), 2 workers (page cache warm)", lambda: audit(path, workers=2),
            max(2, args.repeat // 3), size)

    # Images: decode speed with PIL alone vs the whole audit (decode + statistics + checks).
    from PIL import Image

    img_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
        files = sorted(folder.iterdir())

        def decode_only() -> None:
            for f in files:
                with Image.open(f) as im:
                    np.asarray(im)

        for name, fn in [("PIL decode only, 1 thread", decode_only),
                         ("nanscope.data.audit(folder), 1 worker", lambda: audit(folder.parent, workers=1, progress=False)),
                         ("nanscope.data.audit(folder), 2 workers", lambda: audit(folder.parent, workers=2, progress=False))]:
            ts = _times(fn, 3)
            img_rows.append((name, len(files) / ts[0], len(files) / ts[1]))
            print(f"{name:58s} best {img_rows[-1][1]:7.0f} images/s, median {img_rows[-1][2]:7.0f} images/s")

    lines = [
        "# data_throughput: fused statistics of in-memory float32 arrays",
        "",
        f"Machine: 2-core CPU VM ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 MiB L2 per core, no GPU); "
        f"date {args.date}; numpy {np.__version__}; array {args.mib} MiB float32 (far beyond the 32 MiB L3), {args.repeat} runs each.",
        "",
        f"1-minute load average when the run started: {load_before:.2f} (other work on the VM competes for the 2 cores).",
        "",
        "Target: full statistics (min, max, mean, std, NaN and Inf counts) at >= 4 GB/s on 2 cores.",
        "",
        "Wall-clock GB/s (best and median of the runs), and GB per CPU-second: bytes over the CPU time",
        "of all the process's threads, i.e. the speed of one core that is not shared with other work.",
        "",
        "| what | best GB/s | median GB/s | GB per CPU-second |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {best:.2f} | {median:.2f} | {cpu:.2f} |" for name, best, median, cpu in rows],
        "",
        f"Image folders: {args.images} JPEG files of 256x256x3 (random pixels, quality 90), 3 runs each:",
        "",
        "| what | best images/s | median images/s |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {best:.0f} | {median:.0f} |" for name, best, median in img_rows],
        "",
        "Reproduce: `.venv/bin/python bench/data_throughput.py`",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
