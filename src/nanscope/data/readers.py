"""Framework-free readers: turn a dataset on disk or in memory into a stream of batches.

Design constraints:
    - Bounded memory: ``.npy`` files are memory-mapped and streamed as views of 64 MiB row
      chunks (no copy; the next chunk is prefetched with ``MADV_WILLNEED`` while this one is
      reduced), ``.h5`` datasets read in row chunks; image folders are decoded one file at a
      time per worker, in order, a bounded number of files in flight. Nothing keeps the
      decoded data after its batch is audited.
    - With ``summarize`` each input image is reduced right after decoding, in the decoding
      worker: the audit gets a few numbers per channel, never the pixels. A folder source
      also exposes its files (``Source.files``), so the audit can hand ranges of them to
      worker processes (``can_fork()``); otherwise ``workers`` threads decode ahead.
    - Safe: ``np.load(allow_pickle=False)`` always; a file that needs pickle is refused.
    - Bad input (missing, empty, truncated, bit-flipped or unknown files) raises
      ``BadInputError`` with one line naming the file, never another exception.
    - Frameworks are recognized through ``sys.modules`` only (a torch ``Dataset``/``DataLoader``
      or a ``tf.data.Dataset`` can exist only if the caller imported that framework).

Every reader yields :class:`Batch` objects: the inputs and/or targets of consecutive samples
with a leading sample axis, and the file names when the samples are files.
"""

from __future__ import annotations

import mmap
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanscope.core.errors import BadInputError, MissingDependencyError
from nanscope.data.samples import (
    LabelCounts,
    SampleStats,
    batch_stats,
    channel_axis,
    image_stats,
    label_counts,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
SAMPLE_SUFFIXES = IMAGE_SUFFIXES | {".npy"}
ARRAY_SUFFIXES = {".npy", ".npz", ".h5", ".hdf5"}
INPUT_DIRS = ("images", "image", "imgs", "img", "inputs", "input", "x", "data", "jpegimages", "rgb")
TARGET_DIRS = (
    "masks",
    "mask",
    "labels",
    "label",
    "annotations",
    "annotation",
    "gt",
    "targets",
    "target",
    "y",
    "segmentationclass",
    "segmentations",
    "segmentation",
)
_TARGET_KEY = re.compile(
    r"(^|[_\-/])(y|labels?|targets?|masks?|gt|annotations?|classes|segmentation)s?$", re.I
)
CHUNK_BYTES = (
    64 << 20
)  # rows per array chunk: a view of the mapped .npy (no copy); h5py reads this much


@dataclass
class Batch:
    """Consecutive samples ``start .. start + n - 1`` of one dataset."""

    start: int
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    names: list[str] | None = (
        None  # file names (relative to the dataset root) when samples are files
    )
    target_names: list[str] | None = None

    def __len__(self) -> int:
        for a in (*self.inputs.values(), *self.targets.values()):
            return int(a.shape[0]) if a.ndim else 1
        return 0


@dataclass
class Source:
    """A dataset ready to stream: its batches, how many samples, and what it is."""

    batches: Iterable[Batch]
    total: int | None
    kind: str  # "folder", "npy", "npz", "hdf5", "arrays", "torch", "tensorflow"
    unit: str = "samples"
    framework: str | None = None
    resources: list = field(default_factory=list)  # open files, closed by close()
    files: FolderFiles | None = (
        None  # a folder's files, for audits that split them across processes
    )

    def close(self) -> None:
        while self.resources:
            try:
                self.resources.pop().close()
            except Exception:  # closing a corrupt file can fail again; nothing is left to save
                pass


def is_target_name(name: str) -> bool:
    """Whether an array or folder name looks like labels/masks rather than inputs.

    >>> is_target_name("train/labels"), is_target_name("y"), is_target_name("images")
    (True, True, False)
    """
    return bool(_TARGET_KEY.search(name))


# -- files --------------------------------------------------------------------------------------


def open_source(
    path: str | os.PathLike,
    *,
    masks: str | os.PathLike | None = None,
    workers: int = 1,
    summarize: bool = False,
) -> Source:
    """A dataset on disk: an image/mask folder, a ``.npy``/``.npz`` or an HDF5 file.

    With ``summarize`` the input images of a folder arrive as :class:`SampleStats`, reduced
    in the decoding worker (what the audit needs), instead of as pixel arrays.
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{str(p)!r} does not exist", path=str(p))
    if p.is_dir():
        return _folder(p, Path(masks) if masks else None, workers, summarize)
    if masks:
        raise BadInputError("--masks goes with an image folder, not a single file")
    _nonempty(p)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        arr = load_npy(p)
        role = "targets" if is_target_name(p.stem) else "inputs"
        return Source(
            _array_batches(
                {p.stem: arr} if role == "inputs" else {},
                {p.stem: arr} if role == "targets" else {},
            ),
            _rows(arr),
            "npy",
        )
    if suffix in (".npz", ".h5", ".hdf5"):
        keep: list = []
        try:
            arrays = load_npz(p, keep) if suffix == ".npz" else load_hdf5(p, keep)
            src = _arrays_source(arrays, "npz" if suffix == ".npz" else "hdf5", p)
        except BaseException:
            Source((), 0, "", resources=keep).close()
            raise
        src.resources = keep
        return src
    if suffix in IMAGE_SUFFIXES:
        return _folder_source(FolderFiles([p], None, p.parent, None, summarize), workers)
    raise BadInputError(
        f"{str(p)!r}: unknown dataset format {suffix or '(no suffix)'!r}; "
        "expected a folder of images, .npy, .npz, .h5 or .hdf5"
    )


def _nonempty(p: Path) -> None:
    try:
        if p.stat().st_size == 0:
            raise BadInputError(f"{str(p)!r} is empty", path=str(p))
    except OSError as err:
        raise BadInputError(f"cannot read {str(p)!r}: {err.strerror}", path=str(p)) from None


def load_npy(p: Path) -> np.ndarray:
    """Memory-map a ``.npy`` (read-only, no pickle)."""
    _nonempty(p)
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower() or "python objects" in str(err).lower():
            raise BadInputError(
                f"{str(p)!r} holds Python objects (pickle); nanscope does not unpickle data files"
            ) from None
        raise BadInputError(
            f"{str(p)!r} is not a readable .npy file (truncated or corrupt): {_short(err)}",
            path=str(p),
        ) from None
    except Exception as err:  # bit flips reach numpy's header parser in many ways
        raise BadInputError(
            f"{str(p)!r} is not a readable .npy file (truncated or corrupt): {_short(err)}",
            path=str(p),
        ) from None
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_SEQUENTIAL"):
        try:
            mm.madvise(mmap.MADV_SEQUENTIAL)  # read once, front to back: larger readahead
        except OSError:
            pass
    return arr


def load_npz(p: Path, keep: list) -> dict[str, object]:
    """Arrays of a ``.npz``, each decompressed when its turn comes (one in memory at a time).

    The open handles go to ``keep``; the caller closes them (``Source.close()``).
    """
    _nonempty(p)
    fh = open(p, "rb")  # our own handle: closed even when numpy fails half-way
    try:
        z = np.load(fh, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise BadInputError(f"{str(p)!r} is a .npy file named .npz")
    except BadInputError:
        fh.close()
        raise
    except Exception as err:
        fh.close()
        raise BadInputError(
            f"{str(p)!r} is not a readable .npz file (truncated or corrupt): {_short(err)}",
            path=str(p),
        ) from None
    keep += [z, fh]
    return {k: _ZipArray(z, k, p) for k in z.files}


class _ZipArray:
    """One member of a .npz, decompressed on first use (one array in memory at a time)."""

    def __init__(self, z, key: str, path: Path) -> None:
        self.z, self.key, self.path = z, key, path

    def load(self) -> np.ndarray:
        try:
            return self.z[self.key]
        except ValueError as err:
            if "pickle" in str(err).lower():
                raise BadInputError(
                    f"{str(self.path)!r}: array {self.key!r} holds Python objects (pickle); "
                    "nanscope does not unpickle data files"
                ) from None
            raise BadInputError(
                f"{str(self.path)!r}: array {self.key!r} is unreadable (truncated or corrupt): {_short(err)}"
            ) from None
        except Exception as err:
            raise BadInputError(
                f"{str(self.path)!r}: array {self.key!r} is unreadable (truncated or corrupt): {_short(err)}"
            ) from None


def load_hdf5(p: Path, keep: list) -> dict[str, object]:
    """Numeric datasets of an HDF5 file by path (read lazily in chunks); the file goes to ``keep``."""
    _nonempty(p)
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError("h5py", "data") from None
    try:
        f = h5py.File(p, "r")
        keep.append(f)
        found: dict[str, object] = {}

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "fiub" and obj.shape is not None:
                found[name] = obj

        f.visititems(visit)
    except Exception as err:
        for f in keep:
            f.close()
        keep.clear()
        raise BadInputError(
            f"{str(p)!r} is not a readable HDF5 file (truncated or corrupt): {_short(err)}",
            path=str(p),
        ) from None
    if not found:
        raise BadInputError(f"{str(p)!r} holds no numeric dataset")
    return found


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:160] or type(err).__name__


def _rows(a: object) -> int:
    shape = getattr(a, "shape", None)
    if shape is None:
        return 0
    return int(shape[0]) if len(shape) else 1


def _arrays_source(arrays: dict[str, object], kind: str, path: Path) -> Source:
    inputs = {k: v for k, v in arrays.items() if not is_target_name(k)}
    targets = {k: v for k, v in arrays.items() if is_target_name(k)}
    if not arrays:
        raise BadInputError(f"{str(path)!r} holds no arrays")

    def batches() -> Iterator[Batch]:
        # Each array streams on its own: samples are rows, indices are comparable across arrays.
        for k, v in arrays.items():
            a = v.load() if isinstance(v, _ZipArray) else v
            yield from _array_batches({k: a} if k in inputs else {}, {k: a} if k in targets else {})

    total = (
        max(
            (_rows(v.load() if isinstance(v, _ZipArray) else v) for v in arrays.values()), default=0
        )
        if kind != "npz"
        else None
    )
    return Source(batches(), total, kind)


def _array_batches(inputs: dict[str, object], targets: dict[str, object]) -> Iterator[Batch]:
    """Row chunks of arrays (numpy, memmap or h5py datasets) of about CHUNK_BYTES."""
    arrays = {**inputs, **targets}
    if not arrays:
        return
    first = next(iter(arrays.values()))
    shape = tuple(first.shape)
    if len(shape) == 0:
        yield Batch(
            0,
            {k: np.asarray(v)[None] for k, v in inputs.items()},
            {k: np.asarray(v)[None] for k, v in targets.items()},
        )
        return
    n = shape[0]
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * first.dtype.itemsize)
    step = max(1, CHUNK_BYTES // row_bytes)
    for i in range(0, n, step):
        for v in arrays.values():  # start reading the next chunk while this one is computed
            _prefetch(v, i + step, step)
        try:
            yield Batch(
                i,
                {k: np.asarray(v[i : i + step]) for k, v in inputs.items()},
                {k: np.asarray(v[i : i + step]) for k, v in targets.items()},
            )
        except BadInputError:
            raise
        except Exception as err:  # a truncated HDF5 chunk surfaces only when read
            raise BadInputError(
                f"cannot read rows {i}..{min(n, i + step) - 1}: {_short(err)} (truncated or corrupt file)"
            ) from None


def _prefetch(a: object, row: int, rows: int) -> None:
    """Ask the kernel to read rows ``row .. row + rows - 1`` of a memory-mapped array ahead.

    ``MADV_WILLNEED`` starts the reads and returns: on a cold file the disk works on the next
    chunk while the statistics run on this one. A no-op for arrays that are not mapped.
    """
    mm = getattr(a, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or row >= a.shape[0]:
        return
    try:
        row_bytes = a.strides[0]
        head = a.offset % mmap.ALLOCATIONGRANULARITY  # the mapping starts this far before the data
        begin = head + row * row_bytes
        end = min(len(mm), head + min(a.shape[0], row + rows) * row_bytes)
        page = begin - begin % mmap.PAGESIZE
        mm.madvise(mmap.MADV_WILLNEED, page, end - page)
    except (AttributeError, OSError, ValueError):
        pass  # advice only: reading works without it


# -- folders ------------------------------------------------------------------------------------


def _samples_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in SAMPLE_SUFFIXES and not p.name.startswith(".")
    )


def _folder(root: Path, masks: Path | None, workers: int, summarize: bool) -> Source:
    subdirs = {
        d.name.lower(): d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
    }
    if masks is None:
        image_dir = next((subdirs[n] for n in INPUT_DIRS if n in subdirs), None)
        mask_dir = next((subdirs[n] for n in TARGET_DIRS if n in subdirs), None)
        if image_dir is not None and mask_dir is not None:
            root, masks = image_dir, mask_dir
    elif not masks.is_dir():
        raise BadInputError(f"mask folder {str(masks)!r} does not exist")
    files = _samples_in(root)
    if masks is not None:
        mask_files = {
            p.relative_to(masks).with_suffix("").as_posix(): p for p in _samples_in(masks)
        }
        pairs = [(f, mask_files.get(f.relative_to(root).with_suffix("").as_posix())) for f in files]
        return _folder_source(
            FolderFiles([f for f, _ in pairs], [m for _, m in pairs], root.parent, None, summarize),
            workers,
        )
    if not files:
        arrays = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".npz", ".h5", ".hdf5"))
        if len(arrays) == 1:
            return open_source(arrays[0])
        raise BadInputError(f"{str(root)!r} holds no images (.png/.jpg/.tif/...) or .npy samples")
    # ImageFolder layout (root/class_name/xxx.png): the folder name is the class label.
    top = sorted(
        {f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1}
    )
    if len(top) >= 2 and all(len(f.relative_to(root).parts) == 2 for f in files):
        index = {name: i for i, name in enumerate(top)}
        labels = [index[f.relative_to(root).parts[0]] for f in files]
        return _folder_source(FolderFiles(files, None, root, labels, summarize), workers)
    return _folder_source(FolderFiles(files, None, root, None, summarize), workers)


def read_sample(path: Path, *, as_mask: bool = False) -> np.ndarray:
    """Decode one image or ``.npy`` sample; BadInputError names the file when it is unreadable."""
    return _decode(path, as_mask, np.asarray)


def read_input_stats(path: Path) -> SampleStats | np.ndarray:
    """Decode one input sample and reduce it at once (in the decoding worker): its statistics.

    8-bit images go through Pillow's histogram without a numpy copy; other images and ``.npy``
    samples through one fused ``row_stats`` pass. Non-numeric samples come back as arrays.
    """
    return _decode(path, False, _summarize)


def read_target_counts(path: Path) -> LabelCounts | np.ndarray:
    """Decode one mask; an 8-bit one comes back as its value counts (see ``LabelCounts``)."""
    return _decode(path, True, _count_labels)


def _count_labels(sample: object) -> LabelCounts | np.ndarray:
    counts = label_counts(sample)
    return counts if counts is not None else np.asarray(sample)


def _summarize(sample: object) -> SampleStats | np.ndarray:
    s = image_stats(sample)
    if s is not None:
        return s
    a = np.asarray(sample)
    if a.dtype.kind not in "fiub" or a.ndim == 0:
        return a
    return batch_stats(a[None], channel_axis(tuple(a.shape)))


def _decode(path: Path, as_mask: bool, finish):
    _nonempty(path)
    if path.suffix.lower() == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except Exception as err:
            raise BadInputError(
                f"{str(path)!r} is not a readable .npy file (truncated or corrupt): {_short(err)}",
                path=str(path),
            ) from None
        return finish(a)
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError("pillow", "data") from None
    try:
        with Image.open(path) as im:
            im.load()
            if not as_mask and im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            return finish(im)
    except Exception as err:
        raise BadInputError(
            f"{str(path)!r} is not a readable image (truncated or corrupt): {_short(err)}",
            path=str(path),
        ) from None


@dataclass
class FolderFiles:
    """The files of a folder dataset; picklable, so a worker process can load a range of them."""

    files: list[Path]
    masks: list[Path | None] | None
    root: Path
    labels: list[int] | None
    summarize: bool

    def load(self, i: int) -> Batch:
        f = self.files[i]
        x = read_input_stats(f) if self.summarize else read_sample(f)
        b = Batch(
            i, {"image": x if isinstance(x, SampleStats) else x[None]}, names=[_rel(f, self.root)]
        )
        if self.masks is not None:
            m = self.masks[i]
            if m is not None:
                y = read_target_counts(m) if self.summarize else read_sample(m, as_mask=True)
                b.targets["mask"] = y if isinstance(y, LabelCounts) else y[None]
                b.target_names = [_rel(m, self.root)]
        if self.labels is not None:
            b.targets["label"] = np.array([self.labels[i]])
        return b

    def part(self, lo: int, hi: int) -> FolderFiles:
        cut = slice(lo, hi)
        return FolderFiles(
            self.files[cut],
            None if self.masks is None else self.masks[cut],
            self.root,
            None if self.labels is None else self.labels[cut],
            self.summarize,
        )


PROCESS_TASK = 16  # files per range a worker process audits
_FRAMEWORKS = ("torch", "tensorflow", "jax")


def can_fork() -> bool:
    """Whether worker processes may be forked from this one.

    fork copies the process without its threads: only safe while the calling thread is the
    only one and no framework (CUDA contexts, TF thread pools) lives in the process.
    """
    return (
        sys.platform.startswith("linux")
        and threading.active_count() == 1
        and not any(m in sys.modules for m in _FRAMEWORKS)
    )


def _folder_source(fs: FolderFiles, workers: int) -> Source:
    return Source(_file_batches(fs, workers), len(fs.files), "folder", "files", files=fs)


def _file_batches(fs: FolderFiles, workers: int) -> Iterator[Batch]:
    n = len(fs.files)
    if workers <= 1:
        for i in range(n):
            yield fs.load(i)
        return
    # Threads decoding ahead, in order, at most 4 files per worker in flight (bounded memory).
    # Pillow releases the GIL while it decodes and while it builds the histogram. (The audit
    # uses worker processes instead when it can fork: nanscope.data.audit.)
    ahead = 4 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        nxt = 0
        try:
            while pending or nxt < n:
                while nxt < n and len(pending) < ahead:
                    pending.append(pool.submit(fs.load, nxt))
                    nxt += 1
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def rel_name(fs: FolderFiles, i: int) -> str:
    """File ``i`` of a folder as the audit names it (relative to the dataset root)."""
    return _rel(fs.files[min(i, len(fs.files) - 1)], fs.root)


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


# -- in-memory objects ----------------------------------------------------------------------------


def from_object(obj: object) -> Source:
    """numpy arrays, ``(x, y)`` tuples, dicts of arrays, a torch Dataset/DataLoader or a tf.data.Dataset."""
    if isinstance(obj, np.ndarray):
        return Source(_array_batches({"x": obj}, {}), _rows(obj), "arrays")
    if isinstance(obj, dict) and all(isinstance(v, np.ndarray) for v in obj.values()):
        inputs = {k: v for k, v in obj.items() if not is_target_name(k)}
        targets = {k: v for k, v in obj.items() if is_target_name(k)}
        return Source(_paired(inputs, targets), max(map(_rows, obj.values()), default=0), "arrays")
    if (
        isinstance(obj, tuple | list)
        and 1 <= len(obj) <= 2
        and all(isinstance(v, np.ndarray) for v in obj)
    ):
        return Source(
            _array_batches({"x": obj[0]}, {"y": obj[1]} if len(obj) > 1 else {}),
            _rows(obj[0]),
            "arrays",
        )
    torch = sys.modules.get("torch")
    if torch is not None:
        data = torch.utils.data
        if isinstance(obj, data.DataLoader):
            return Source(
                _element_batches(obj, batched=True), _len(obj.dataset), "torch", framework="torch"
            )
        if isinstance(obj, data.Dataset):
            seq = (
                (obj[i] for i in range(len(obj)))
                if hasattr(obj, "__len__")
                and hasattr(obj, "__getitem__")
                and not isinstance(obj, data.IterableDataset)
                else iter(obj)
            )
            return Source(
                _element_batches(seq, batched=False), _len(obj), "torch", framework="torch"
            )
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(obj, tf.data.Dataset):
        spec = obj.element_spec
        first = (
            spec[0]
            if isinstance(spec, tuple)
            else (next(iter(spec.values())) if isinstance(spec, dict) else spec)
        )
        batched = bool(first.shape.rank) and first.shape[0] is None
        card = int(obj.cardinality())
        return Source(
            _element_batches(obj.as_numpy_iterator(), batched=batched),
            card if card >= 0 and not batched else None,
            "tensorflow",
            framework="keras",
        )
    raise BadInputError(
        f"cannot audit a {type(obj).__name__}: pass a path, numpy arrays, (x, y), a dict of arrays, "
        "a torch Dataset/DataLoader or a tf.data.Dataset"
    )


def _len(obj: object) -> int | None:
    try:
        return len(obj)  # type: ignore[arg-type]
    except TypeError:
        return None


def _paired(inputs: dict, targets: dict) -> Iterator[Batch]:
    for k, v in {**inputs, **targets}.items():
        yield from _array_batches({k: v} if k in inputs else {}, {k: v} if k in targets else {})


def to_numpy(value: object) -> np.ndarray:
    """A torch/TF tensor, PIL image or number as a numpy array (bfloat16 through float32)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch.Tensor
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    if hasattr(value, "numpy"):  # tf.Tensor
        return np.asarray(value.numpy())
    return np.asarray(value)


def _split(element: object) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    if isinstance(element, dict):
        ins = {k: to_numpy(v) for k, v in element.items() if not is_target_name(str(k))}
        tgs = {k: to_numpy(v) for k, v in element.items() if is_target_name(str(k))}
        return ins, tgs
    if isinstance(element, tuple | list):
        ins = {"x": to_numpy(element[0])} if len(element) else {}
        tgs = {"y": to_numpy(element[1])} if len(element) > 1 else {}
        return ins, tgs
    return {"x": to_numpy(element)}, {}


def _element_batches(elements: Iterable, *, batched: bool) -> Iterator[Batch]:
    start = 0
    for el in elements:
        ins, tgs = _split(el)
        if not batched:
            ins = {k: v[None] for k, v in ins.items()}
            tgs = {k: v[None] for k, v in tgs.items()}
        b = Batch(start, ins, tgs)
        yield b
        start += len(b)
