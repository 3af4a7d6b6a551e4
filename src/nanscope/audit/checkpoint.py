"""Read a saved model into plain numpy arrays: PyTorch, safetensors, Keras ``.keras`` and ``.h5``.

Design constraints:
    - Never runs code from the file by default. PyTorch files are read by
      ``nanscope.audit.torchfile``: a restricted unpickler of nanscope's own that accepts only
      what ``torch.load(weights_only=True)`` accepts for tensors and containers, and maps the
      storages into numpy without importing torch. A file that needs full unpickling is
      refused unless the caller passes ``trust_pickle=True`` (then ``nanscope.torch.audit``
      loads it with torch); torch is also used, with ``weights_only=True``, for the tensor
      kinds the reader does not build (quantized, sparse, nested). safetensors files are
      parsed here from their JSON header (no framework, bfloat16 included). Keras files are
      read with h5py (weights) and json (config): no Keras import, no deserialized code.
    - Every unreadable file (missing, empty, truncated, bit-flipped, wrong format) raises
      ``BadInputError`` with one line naming the file.
    - Names are the framework's: ``layer4.2.bn3.running_var`` (torch), ``bn.moving_variance``
      (keras), so findings can be searched in the user's code.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanscope.core.errors import BadInputError, MissingDependencyError

TORCH_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".tar"}
KERAS_SUFFIXES = {".keras", ".h5", ".hdf5"}


@dataclass
class Checkpoint:
    """A saved model as numpy arrays, with what the audit needs to know about each tensor."""

    path: Path
    format: str  # "torch", "safetensors", "keras", "h5"
    framework: str  # "torch" or "keras"
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # parameters and buffers
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)  # optimizer state by name
    dtypes: dict[str, str] = field(default_factory=dict)  # stored dtype (bfloat16 kept by name)
    norm_layers: dict[str, tuple[str | None, str | None]] = field(
        default_factory=dict
    )  # layer -> (mean, var)
    hyper: dict[str, float] = field(default_factory=dict)  # optimizer lr / eps when stored
    notes: list[str] = field(default_factory=list)


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Read any supported checkpoint; the format comes from the file's first bytes and suffix.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> write_safetensors(p, {"bn.running_var": np.ones(2, np.float32)})
        >>> read_checkpoint(p).norm_layers
        {'bn': (None, 'bn.running_var')}
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{str(p)!r} does not exist", path=str(p))
    if p.is_dir():
        raise BadInputError(f"{str(p)!r} is a folder, not a checkpoint file", path=str(p))
    size = p.stat().st_size
    if size == 0:
        raise BadInputError(f"{str(p)!r} is empty", path=str(p))
    with open(p, "rb") as fh:
        head = fh.read(8)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        ck = _read_safetensors(p, size)
    elif suffix == ".keras" or (head[:2] == b"PK" and suffix in KERAS_SUFFIXES):
        ck = _read_keras_zip(p)
    elif head[:8] == b"\x89HDF\r\n\x1a\n" or suffix in (".h5", ".hdf5"):
        ck = _read_h5(p)
    elif suffix in TORCH_SUFFIXES or head[:2] == b"PK" or head[:1] == b"\x80":
        ck = _read_torch(p, trust_pickle)
    else:
        raise BadInputError(
            f"{str(p)!r}: unknown checkpoint format {suffix or '(no suffix)'!r}; "
            "expected .pt/.pth, .safetensors, .keras or .h5"
        )
    if not ck.tensors and not ck.optimizer:
        raise BadInputError(
            f"{str(p)!r} holds no model weights nanscope recognizes ({ck.format} file)", path=str(p)
        )
    ck.norm_layers = ck.norm_layers or find_norm_layers(ck.tensors)
    return ck


def _read_torch(p: Path, trust_pickle: bool) -> Checkpoint:
    """nanscope's own restricted reader (no torch import); torch only for what it cannot build
    (quantized, sparse, nested tensors: ``weights_only=True`` still) or under ``--trust-pickle``."""
    why = None
    if not trust_pickle:
        from nanscope.audit.torchfile import NeedsTorch, read_torch_file

        try:
            return read_torch_file(p)
        except NeedsTorch as err:
            why = str(err)
    try:
        from nanscope.torch.audit import read_torch_checkpoint
    except MissingDependencyError:
        if why is not None:
            raise BadInputError(
                f"{str(p)!r} holds tensors nanscope reads only through torch ({why}): "
                "pip install torch",
                path=str(p),
            ) from None
        raise MissingDependencyError("torch (needed for --trust-pickle)", "torch") from None
    return read_torch_checkpoint(p, trust_pickle=trust_pickle)


def find_norm_layers(tensors: dict[str, np.ndarray]) -> dict[str, tuple[str | None, str | None]]:
    """Normalization layers by their statistics' names (``running_*`` / ``moving_*``).

    >>> find_norm_layers({"a.bn.running_mean": 0, "a.bn.running_var": 0, "fc.weight": 0})
    {'a.bn': ('a.bn.running_mean', 'a.bn.running_var')}
    """
    out: dict[str, list[str | None]] = {}
    for name in tensors:
        layer, _, leaf = name.replace("/", ".").rpartition(".")
        leaf = leaf.split(":")[0]
        if leaf in ("running_mean", "moving_mean"):
            out.setdefault(layer, [None, None])[0] = name
        elif leaf in ("running_var", "moving_variance"):
            out.setdefault(layer, [None, None])[1] = name
    return {k: (v[0], v[1]) for k, v in out.items()}


def _bad(p: Path, what: str, err: BaseException | str) -> BadInputError:
    reason = err if isinstance(err, str) else " ".join(str(err).split())[:160] or type(err).__name__
    return BadInputError(
        f"{str(p)!r} is not a readable {what} (truncated or corrupt): {reason}", path=str(p)
    )


# -- safetensors --------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": "bfloat16",
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v).str: k for k, v in _ST_DTYPES.items() if v != "bfloat16"}


def _read_safetensors(p: Path, size: int) -> Checkpoint:
    try:
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 1 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(fh.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data = (
            np.memmap(p, dtype=np.uint8, mode="r", offset=8 + n)
            if size > 8 + n
            else np.zeros(0, np.uint8)
        )
        if isinstance(data, np.memmap):
            from nanscope.audit.torchfile import advise_read_ahead

            advise_read_ahead(data._mmap, size)  # read ahead while the first tensors are checked
        ck = Checkpoint(p, "safetensors", "torch")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt, shape, (begin, end) = (
                info["dtype"],
                [int(s) for s in info["shape"]],
                info["data_offsets"],
            )
            if dt not in _ST_DTYPES:
                ck.notes.append(f"{name}: dtype {dt} not audited")
                continue
            kind = _ST_DTYPES[dt]
            item = 2 if kind == "bfloat16" else np.dtype(kind).itemsize
            count = math.prod(shape)
            if not (0 <= begin <= end <= data.size) or end - begin != count * item:
                raise ValueError(f"tensor {name!r} lies outside the file or has the wrong length")
            raw = data[begin:end]
            if kind == "bfloat16":
                arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
                ck.dtypes[name] = "bfloat16"
            else:
                arr = raw.view(kind).reshape(shape)
                ck.dtypes[name] = np.dtype(kind).name
            ck.tensors[name] = arr
        return ck
    except BadInputError:
        raise
    except Exception as err:
        raise _bad(p, "safetensors file", err) from None


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray]) -> None:
    """Write numpy arrays as a safetensors file (used by repair and by tests)."""
    header: dict = {}
    offset = 0
    blobs = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        header[name] = {
            "dtype": _ST_NAMES[a.dtype.str],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        blobs.append(a.tobytes())
        offset += a.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for b in blobs:
            fh.write(b)


# -- Keras --------------------------------------------------------------------------------------


def _h5py():
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError("h5py", "data") from None
    return h5py


def _read_keras_zip(p: Path) -> Checkpoint:
    try:
        with zipfile.ZipFile(p) as z:
            names = set(z.namelist())
            config = json.loads(z.read("config.json")) if "config.json" in names else None
            if "model.weights.h5" not in names:
                raise ValueError("no model.weights.h5 inside")
            blob = z.read("model.weights.h5")
    except BadInputError:
        raise
    except Exception as err:
        raise _bad(p, ".keras file", err) from None
    ck = Checkpoint(p, "keras", "keras")
    _walk_keras_h5(p, io.BytesIO(blob), ck, _layer_classes(config))
    return ck


def _layer_classes(config: object) -> dict[str, dict]:
    """Layer name -> {"class_name", "center", "scale"} from a Keras config, nested models included."""
    found: dict[str, dict] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            cfg = node.get("config")
            if (
                isinstance(node.get("class_name"), str)
                and isinstance(cfg, dict)
                and isinstance(cfg.get("name"), str)
            ):
                found.setdefault(
                    cfg["name"],
                    {
                        "class_name": node["class_name"],
                        "center": cfg.get("center", True),
                        "scale": cfg.get("scale", True),
                    },
                )
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return found


def _read_h5(p: Path) -> Checkpoint:
    h5py = _h5py()
    try:
        with h5py.File(p, "r") as f:
            legacy = "model_weights" in f or "layer_names" in f.attrs
        ck = Checkpoint(p, "h5", "keras")
        if legacy:
            _walk_legacy_h5(p, ck)
        else:
            _walk_keras_h5(p, p, ck, {})
        return ck
    except BadInputError:
        raise
    except Exception as err:
        raise _bad(p, "HDF5 file", err) from None


def _walk_keras_h5(p: Path, source: object, ck: Checkpoint, classes: dict[str, dict]) -> None:
    """Keras 3 weights: ``layers/<path>/vars/<i>``, ``optimizer/vars/<i>``."""
    h5py = _h5py()
    try:
        with h5py.File(source, "r") as f:
            groups: list[tuple[str, object]] = []
            f.visititems(
                lambda name, obj: (
                    groups.append((name, obj))
                    if isinstance(obj, h5py.Group) and name.split("/")[-1] == "vars"
                    else None
                )
            )
            for gpath, g in groups:
                keys = sorted(
                    (k for k in g.keys() if isinstance(g[k], h5py.Dataset)),
                    key=lambda k: int(k) if k.isdigit() else 10**9,
                )
                if not keys:
                    continue
                is_opt = gpath.split("/")[0] == "optimizer"
                layer = str(g.attrs.get("name", gpath.rsplit("/vars", 1)[0]))
                info = classes.get(layer, {})
                parent = gpath.split("/")[-2] if "/" in gpath else ""
                cls = info.get("class_name") or (
                    "BatchNormalization" if parent.startswith("batch_normalization") else ""
                )
                names = _keras_var_names(cls, len(keys), info)
                for k, leaf in zip(keys, names, strict=True):
                    arr = np.asarray(g[k][()])
                    full = f"optimizer.{k}" if is_opt else f"{layer}.{leaf}"
                    (ck.optimizer if is_opt else ck.tensors)[full] = arr
                    ck.dtypes[full] = arr.dtype.name
                    if is_opt and k == "1" and arr.ndim == 0 and arr.dtype.kind == "f":
                        ck.hyper["lr"] = float(arr)
                if cls == "BatchNormalization" and len(keys) >= 2:
                    ck.norm_layers[layer] = (f"{layer}.moving_mean", f"{layer}.moving_variance")
    except BadInputError:
        raise
    except Exception as err:
        raise _bad(p, "Keras weights file", err) from None


def _keras_var_names(cls: str, n: int, info: dict) -> list[str]:
    if cls == "BatchNormalization" and n >= 2:
        head = (["gamma"] if info.get("scale", True) else []) + (
            ["beta"] if info.get("center", True) else []
        )
        head = head[: n - 2] + [f"vars.{i}" for i in range(len(head), n - 2)]
        return head + ["moving_mean", "moving_variance"]
    if (cls.startswith("Conv") or cls == "Dense") and n in (1, 2):
        return ["kernel", "bias"][:n]
    return [f"vars.{i}" for i in range(n)]


def _walk_legacy_h5(p: Path, ck: Checkpoint) -> None:
    """Keras 2 / tf.keras HDF5: ``model_weights/<layer>/<layer>/kernel:0``, ``optimizer_weights/...``."""
    h5py = _h5py()
    with h5py.File(p, "r") as f:

        def visit(name: str, obj: object) -> None:
            if not isinstance(obj, h5py.Dataset) or obj.dtype.kind not in "fiub":
                return
            is_opt = name.startswith("optimizer_weights/")
            parts = (
                name.split("/")[1:]
                if name.split("/")[0] in ("model_weights", "optimizer_weights")
                else name.split("/")
            )
            if len(parts) >= 2 and parts[0] == parts[1]:
                parts = parts[1:]
            full = ("optimizer." if is_opt else "") + ".".join(x.split(":")[0] for x in parts)
            arr = np.asarray(obj[()])
            (ck.optimizer if is_opt else ck.tensors)[full] = arr
            ck.dtypes[full] = arr.dtype.name

        f.visititems(visit)
