"""Read a PyTorch ``.pt``/``.pth`` checkpoint into numpy arrays without importing torch.

Design constraints:
    - No torch import: importing torch (a CUDA build) takes 2-3 s, loading and checking the
      weights a tenth of that. A ``torch.save`` file is a zip holding ``data.pkl`` (a pickle of
      containers and tensor-rebuild calls) and one raw member per storage; the legacy format
      (``_use_new_zipfile_serialization=False``) is the same pickle followed by the raw storages.
    - Safe by construction: the pickle goes through a restricted unpickler that resolves only
      the globals ``torch.load(weights_only=True)`` needs for plain tensors and containers
      (``torch._utils._rebuild_tensor_v2`` and ``_rebuild_parameter``, ``collections.OrderedDict``,
      the ``torch.FloatStorage``-style storage types, torch dtypes, ``torch.device``,
      ``torch.Size``, ``_codecs.encode``, ``set``...), each mapped to a function of nanscope's own
      that builds numpy arrays or plain values. Nothing from the file is imported or called;
      any other global (``os.system``, ``builtins.eval``, a model class) is refused with one line
      naming ``--trust-pickle``. Globals that ``weights_only`` accepts but this reader does not
      build (quantized, sparse, nested tensors) raise :class:`NeedsTorch`, and the caller
      falls back to ``torch.load(weights_only=True)`` when torch is installed.
    - Storages are not copied: each is a view of one read-only ``np.memmap`` of the file
      (uncompressed zip members, as torch writes them, and legacy files), and each tensor is
      ``as_strided`` over its storage after checking that offset, sizes and strides stay inside
      it (a corrupt or hostile file cannot make numpy read outside the storage). bfloat16 is read
      as uint16 and widened to float32; the stored dtype is kept by name.
    - Every unreadable file raises ``BadInputError`` with one line naming the file.
"""

from __future__ import annotations

import collections
import io
import math
import mmap
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanscope.core.errors import BadInputError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_EXPANDED = 1 << 24  # elements a broadcast (zero-stride) view may show beyond its storage's

# storage type name -> (numpy dtype, dtype name); bfloat16 is read as uint16 and widened
_STORAGES: dict[str, tuple[str, str]] = {
    "FloatStorage": ("<f4", "float32"),
    "DoubleStorage": ("<f8", "float64"),
    "HalfStorage": ("<f2", "float16"),
    "BFloat16Storage": ("<u2", "bfloat16"),
    "LongStorage": ("<i8", "int64"),
    "IntStorage": ("<i4", "int32"),
    "ShortStorage": ("<i2", "int16"),
    "CharStorage": ("i1", "int8"),
    "ByteStorage": ("u1", "uint8"),
    "BoolStorage": ("?", "bool"),
    "ComplexFloatStorage": ("<c8", "complex64"),
    "ComplexDoubleStorage": ("<c16", "complex128"),
}
# Storage types whose elements numpy cannot hold (float8, bits, quantized): kept by name, not audited.
_OPAQUE_STORAGES = {
    "Float8_e4m3fnStorage": 1,
    "Float8_e5m2Storage": 1,
    "Float8_e4m3fnuzStorage": 1,
    "Float8_e5m2fnuzStorage": 1,
    "QUInt8Storage": 1,
    "QInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
    "UInt16Storage": 2,
    "UInt32Storage": 4,
    "UInt64Storage": 8,
    "ComplexHalfStorage": 4,
    "BitsStorage": 1,
}
_NUMPY_OF = {
    "UInt16Storage": ("<u2", "uint16"),
    "UInt32Storage": ("<u4", "uint32"),
    "UInt64Storage": ("<u8", "uint64"),
}
_TORCH_DTYPES = {
    "float32",
    "float",
    "float64",
    "double",
    "float16",
    "half",
    "bfloat16",
    "int64",
    "long",
    "int32",
    "int",
    "int16",
    "short",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
    "cfloat",
    "cdouble",
    "float8_e4m3fn",
    "float8_e5m2",
    "uint16",
    "uint32",
    "uint64",
    "qint8",
    "quint8",
    "qint32",
}
# Accepted by torch.load(weights_only=True) but not built here: the caller may fall back to torch.
_TORCH_ONLY = {
    ("torch._utils", "_rebuild_qtensor"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._utils", "_rebuild_nested_tensor"),
    ("torch._utils", "_rebuild_sparse_csr_tensor"),
    ("torch._utils", "_rebuild_wrapper_subclass"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch.serialization", "_get_layout"),
    ("torch", "per_tensor_affine"),
    ("torch", "per_channel_affine"),
    ("torch", "sparse_coo"),
    ("torch", "sparse_csr"),
    ("torch", "strided"),
    ("torch._tensor", "_rebuild_from_type"),
    ("torch.nn.parameter", "UninitializedParameter"),
    ("torch", "Generator"),
}


class NeedsTorch(Exception):  # noqa: N818 - a signal to the caller, not an error shown to users
    """The file holds something torch's own ``weights_only`` loader can read and this one cannot."""


@dataclass
class PtTensor:
    """A tensor read from the file: its values as numpy, and torch's dtype name."""

    array: np.ndarray | None  # None for dtypes numpy cannot hold
    dtype: str
    shape: tuple[int, ...]

    def __float__(self) -> float:
        if self.array is None or self.array.size != 1:
            raise TypeError("not a one-element tensor")
        return float(self.array.reshape(-1)[0])


@dataclass
class _Storage:
    data: np.ndarray | None  # elements (uint16 for bfloat16), or None when not held by numpy
    dtype: str
    numel: int
    pending: bool = False  # legacy files: located after the pickle


@dataclass
class _LazyTensor:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


class _TorchMarker(str):
    """A torch dtype, device or layout name, kept as text (``torch.float16``)."""


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
) -> PtTensor:
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride) -> PtTensor:
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None) -> PtTensor:
    if not isinstance(data, PtTensor | _LazyTensor):
        raise ValueError("_rebuild_parameter of something that is not a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state) -> PtTensor:
    return _rebuild_parameter(data)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_parameter) or new_type not in (
        _TENSOR,
        _PARAMETER,
    ):
        raise NeedsTorch("a tensor subclass")
    return func(*args)


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise ValueError("unexpected _codecs.encode call")
    return text.encode(encoding)


def _device(*args) -> _TorchMarker:
    return _TorchMarker("device(" + ", ".join(map(str, args)) + ")")


def _size(values=()) -> tuple:
    return tuple(int(v) for v in values)


_TENSOR = _TorchMarker("torch.Tensor")
_PARAMETER = _TorchMarker("torch.nn.Parameter")

_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TENSOR,
    ("torch.nn.parameter", "Parameter"): _PARAMETER,
    ("torch", "device"): _device,
    ("torch", "Size"): _size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "slice"): slice,
}
_PY2 = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _Unpickler(pickle.Unpickler):
    """Resolves only the names above; storages come from ``storages(pid)``."""

    def __init__(self, file, storages, path: Path) -> None:
        super().__init__(file, encoding="utf-8")
        self._storages, self._path = storages, path

    def find_class(self, module: str, name: str) -> object:
        module = _PY2.get(module, module)
        found = _GLOBALS.get((module, name))
        if found is not None:
            return found
        if (
            module == "torch"
            and name.endswith("Storage")
            and (name in _STORAGES or name in _OPAQUE_STORAGES)
        ):
            return _StorageType(name)
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
            return _StorageType("ByteStorage")
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchMarker(f"torch.{name}")
        if (module, name) in _TORCH_ONLY:
            raise NeedsTorch(f"{module}.{name}")
        raise BadInputError(
            f"{str(self._path)!r} needs full unpickling (it names {module}.{name}, not only tensors), which can run "
            "arbitrary code; nanscope refused to load it. Re-run with --trust-pickle only if you trust its source",
            path=str(self._path),
        )

    def persistent_load(self, pid: object) -> _Storage:
        if not (
            isinstance(pid, tuple)
            and len(pid) >= 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
        ):
            raise ValueError(f"unexpected persistent id {str(pid)[:60]}")
        return self._storages(pid)


def _tensor(storage, offset, size, stride) -> PtTensor:
    if not isinstance(storage, _Storage):
        raise ValueError("a tensor without a storage")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(offset)
    if storage.pending:  # a legacy file: the storage's bytes come after the pickle
        return _LazyTensor(storage, offset, size, stride)  # type: ignore[return-value]
    if (
        len(size) != len(stride)
        or any(s < 0 for s in size)
        or any(s < 0 for s in stride)
        or offset < 0
    ):
        raise ValueError(f"tensor of size {size} and stride {stride} is malformed")
    numel = math.prod(size)
    if (
        numel
        and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= storage.numel
    ):
        raise ValueError(
            f"tensor of size {size}, stride {stride}, offset {offset} lies outside its storage of {storage.numel}"
        )
    if numel > max(storage.numel, _MAX_EXPANDED):  # zero strides: a view far larger than its bytes
        raise ValueError(
            f"tensor of size {size} expands a storage of {storage.numel} elements {numel // max(1, storage.numel)}-fold"
        )
    if storage.data is None:
        return PtTensor(None, storage.dtype, size)
    base = storage.data
    if not numel:
        arr = np.zeros(size, base.dtype)
    elif stride == _contiguous(size):  # the usual case: a plain view, cheaper than as_strided
        arr = base[offset : offset + numel].reshape(size)
    else:
        item = base.dtype.itemsize
        arr = np.lib.stride_tricks.as_strided(
            base[offset:], shape=size, strides=[s * item for s in stride], writeable=False
        )
    if storage.dtype == "bfloat16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return PtTensor(arr, storage.dtype, size)


def _contiguous(size: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(size):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


def _map(p: Path, size: int) -> np.ndarray:
    """The whole file as a read-only uint8 array over an mmap (a plain ndarray: its slices cost
    less than np.memmap's, whose every view runs Python code)."""
    if not size:
        return np.zeros(0, np.uint8)
    with open(p, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    advise_read_ahead(mm, size)
    return np.frombuffer(mm, dtype=np.uint8)  # the array keeps the mapping alive


WILLNEED_MAX = 4 << 30  # read a whole file ahead up to this size; beyond it, only sequential advice


def advise_read_ahead(mm: mmap.mmap, size: int) -> None:
    """Start reading a cold file into the page cache while the pickle is parsed and the first
    tensors are checked (MADV_WILLNEED returns at once): disk and CPU work at the same time."""
    try:
        if size <= WILLNEED_MAX and hasattr(mmap, "MADV_WILLNEED"):
            mm.madvise(mmap.MADV_WILLNEED)
        elif hasattr(mmap, "MADV_SEQUENTIAL"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
    except OSError:
        pass  # advice only


def _storage(raw: np.ndarray | None, type_name: str, numel: int, big_endian: bool) -> _Storage:
    if type_name in _STORAGES or type_name in _NUMPY_OF:
        code, dname = _STORAGES.get(type_name) or _NUMPY_OF[type_name]
        dt = np.dtype(code)
        if big_endian:
            dt = dt.newbyteorder(">")
        if raw is None:
            raise ValueError("storage data missing")
        if raw.size < numel * dt.itemsize:
            raise ValueError(f"storage holds {raw.size} bytes, {numel * dt.itemsize} needed")
        return _Storage(raw[: numel * dt.itemsize].view(dt), dname, numel)
    return _Storage(None, type_name.removesuffix("Storage").lower(), numel)


def _itemsize(type_name: str) -> int:
    if type_name in _STORAGES:
        return np.dtype(_STORAGES[type_name][0]).itemsize
    return _OPAQUE_STORAGES[type_name]


def read_pt(path: str | Path) -> object:
    """The object ``torch.load(path, weights_only=True)`` would return, with tensors as :class:`PtTensor`.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "evil.pt")
        >>> with open(p, "wb") as fh:
        ...     _ = fh.write(pickle.dumps(print))  # a pickle naming builtins.print
        >>> from nanscope.core.errors import BadInputError
        >>> try:
        ...     read_pt(p)
        ... except BadInputError as err:
        ...     "it names builtins.print" in str(err), "--trust-pickle" in str(err)
        (True, True)
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
        if head[:2] == b"PK":
            return _read_zip(p)
        if head[:1] == b"\x80":
            return _read_legacy(p)
        if head[:1] in (
            b"(",
            b"}",
            b"]",
            b"c",
        ):  # protocol 0/1 pickle: refused or read the same way
            return _read_legacy(p)
        raise ValueError("neither a zip archive nor a pickle")
    except (BadInputError, NeedsTorch):
        raise
    except Exception as err:
        raise BadInputError(
            f"{str(p)!r} is not a readable PyTorch file (truncated or corrupt): {_short(err)}",
            path=str(p),
        ) from None


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:160] or type(err).__name__


def _read_zip(p: Path) -> object:
    size = p.stat().st_size
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise ValueError("no data.pkl in the archive (not a torch.save file)")
        prefix = pkl[: -len("data.pkl")]
        big = prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() == b"big"
        blob = z.read(pkl)
        infos = {i.filename: i for i in z.infolist()}
        mapped = _map(p, size)
        cache: dict[str, _Storage] = {}

        def storages(pid: tuple) -> _Storage:
            _, stype, key, _location, numel = pid[:5]
            key, numel = str(key), int(numel)
            if key in cache:
                return cache[key]
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise ValueError(f"storage {key!r} is missing from the archive")
            if info.compress_type == zipfile.ZIP_STORED:
                local = mapped[info.header_offset : info.header_offset + 30].tobytes()
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise ValueError(f"storage {key!r}: bad zip entry header")
                n_name, n_extra = struct.unpack("<HH", local[26:30])
                begin = info.header_offset + 30 + n_name + n_extra
                if begin + info.file_size > size:
                    raise ValueError(f"storage {key!r} runs past the end of the file")
                raw = mapped[begin : begin + info.file_size]
            else:  # not written by torch, but a valid zip: decompress this one member
                raw = np.frombuffer(z.read(info), np.uint8)
            if (
                stype.name not in _STORAGES
                and stype.name not in _NUMPY_OF
                and raw.size < numel * _itemsize(stype.name)
            ):
                raise ValueError(f"storage {key!r} is shorter than its {numel} elements")
            cache[key] = s = _storage(raw, stype.name, numel, big)
            return s

        return _Unpickler(io.BytesIO(blob), storages, p).load()


def _read_legacy(p: Path) -> object:
    """``_use_new_zipfile_serialization=False``: magic, protocol, sys_info, the object, the storage
    keys, then each storage as an int64 element count and its raw bytes, in key order."""
    size = p.stat().st_size
    made: dict[str, tuple[_Storage, str]] = {}

    def storages(pid: tuple) -> _Storage:
        _, stype, key, _location, numel = pid[:5]
        key = str(key)
        if (
            len(pid) > 5 and pid[5] is not None
        ):  # (view_key, offset, size): torch < 1.0 storage views
            raise ValueError("storage views of the pre-1.0 format are not supported")
        if key not in made:
            made[key] = (_Storage(None, "", int(numel), pending=True), stype.name)
        return made[key][0]

    with open(p, "rb") as fh:
        magic = _Unpickler(fh, storages, p).load()
        if magic != LEGACY_MAGIC:
            if isinstance(magic, int | str | bytes | list | dict | tuple | float) or magic is None:
                raise ValueError("a pickle, but not one written by torch.save")
            raise ValueError("not a torch.save file")
        protocol = _Unpickler(fh, storages, p).load()
        if protocol != 1001:
            raise ValueError(f"unsupported legacy protocol {protocol!r}")
        _Unpickler(fh, storages, p).load()  # sys_info: byte order and type sizes
        obj = _Unpickler(fh, storages, p).load()
        keys = _Unpickler(fh, storages, p).load()
        if not isinstance(keys, list):
            raise ValueError("storage key list missing")
        pos = fh.tell()
    mapped = _map(p, size)
    for key in keys:
        key = str(key)
        if key not in made:
            raise ValueError(f"storage {key!r} is not used by any tensor")
        s, type_name = made[key]
        if pos + 8 > size:
            raise ValueError("file ends before its storages")
        count = int.from_bytes(bytes(mapped[pos : pos + 8]), "little")
        pos += 8
        nbytes = count * _itemsize(type_name)
        if count != s.numel or pos + nbytes > size:
            raise ValueError(f"storage {key!r} is truncated or its size does not match")
        fresh = _storage(mapped[pos : pos + nbytes], type_name, count, False)
        s.data, s.dtype, s.pending = fresh.data, fresh.dtype, False
        pos += nbytes
    unread = [k for k, (s, _) in made.items() if s.pending]
    if unread:
        raise ValueError(f"storage {unread[0]!r} is missing")
    return _resolve(obj)


def _resolve(obj: object) -> object:
    """Legacy files: tensors were built before their storages were located; build them again."""
    if isinstance(obj, _LazyTensor):
        return _tensor(obj.storage, obj.offset, obj.size, obj.stride)
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _resolve(obj[k])
        return obj
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    return obj


# -- the checkpoint's layout: the same reading as nanscope.torch.audit, on PtTensor ----------------

MODEL_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "model_state")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt", "optimizer_state")
_BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict) and bool(obj) and all(isinstance(v, PtTensor) for v in obj.values())
    )


def _split(obj: object, path: Path) -> tuple[object, dict, dict | None]:
    """(key of the model state dict or None when ``obj`` is one, the state dict, the optimizer state)."""
    if _is_state_dict(obj):
        return None, obj, None  # type: ignore[return-value]
    if not isinstance(obj, dict):
        raise BadInputError(
            f"the checkpoint holds a {type(obj).__name__}, not a state dict or a dict of them"
        )
    model_key = next((k for k in MODEL_KEYS if k in obj and _is_state_dict(obj[k])), None)
    if model_key is None:
        model_key = next((k for k, v in obj.items() if _is_state_dict(v)), None)
    sd = obj[model_key] if model_key is not None else {}
    opt_key = next(
        (k for k in OPTIMIZER_KEYS if isinstance(obj.get(k), dict) and "state" in obj[k]), None
    )
    if (
        opt_key is None
        and isinstance(obj.get("optimizer_states"), list)
        and obj["optimizer_states"]
    ):
        first = obj["optimizer_states"][0]  # PyTorch Lightning: one state dict per optimizer
        return model_key, sd, first if isinstance(first, dict) and "state" in first else None
    return model_key, sd, obj[opt_key] if opt_key else None


def read_torch_file(path: str | Path):
    """A ``.pt``/``.pth`` file as a :class:`nanscope.audit.checkpoint.Checkpoint`, without torch.

    Raises :class:`NeedsTorch` when only torch's own loader can read it.
    """
    from nanscope.audit.checkpoint import Checkpoint

    p = Path(path)
    obj = read_pt(p)
    model_key, sd, opt = _split(obj, p)
    ck = Checkpoint(p, "torch", "torch")
    for name, t in sd.items():
        _add(ck.tensors, ck, name, t)
    if isinstance(obj, dict) and model_key is not None:
        # other tensors of a training checkpoint (EMA weights, scaler state) are audited too
        for k, v in obj.items():
            if k != model_key and _is_state_dict(v) and k not in OPTIMIZER_KEYS:
                for name, t in v.items():
                    _add(ck.tensors, ck, f"{k}.{name}", t)
    if opt is not None:
        _optimizer(opt, sd, ck)
    if not ck.tensors and not ck.optimizer:
        raise BadInputError(f"{str(p)!r} holds no tensors nanscope can audit")
    return ck


def _add(into: dict, ck, name: str, t: PtTensor) -> None:
    if t.array is None:
        ck.notes.append(f"{name}: dtype {t.dtype} not audited")
        return
    into[name] = t.array
    ck.dtypes[name] = t.dtype


def _optimizer(opt: dict, sd: dict, ck) -> None:
    groups = opt.get("param_groups") or []
    ids = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
    # Parameters are the state-dict entries that are not buffers, in order (model.parameters()).
    params = [n for n in sd if n.rsplit(".", 1)[-1] not in _BUFFER_LEAVES]
    named = dict(zip(ids, params, strict=False)) if len(params) == len(ids) else {}
    for g in groups:
        if not isinstance(g, dict):
            continue
        for key in ("lr", "eps"):
            v = g.get(key)
            if isinstance(v, float | int | PtTensor):
                try:
                    v = float(v)
                except TypeError:
                    continue
                ck.hyper[key] = v if key not in ck.hyper or not np.isfinite(v) else ck.hyper[key]
    state = opt.get("state") or {}
    if not isinstance(state, dict):
        return
    for pid, entries in state.items():
        if not isinstance(entries, dict):
            continue
        label = named.get(pid, f"param {pid}")
        for k, t in entries.items():
            if isinstance(t, PtTensor):
                _add(ck.optimizer, ck, f"optimizer[{label}].{k}", t)
