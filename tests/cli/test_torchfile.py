"""nanscope's own .pt reader, without torch: files in torch.save's layout (a zip of data.pkl and
raw storages, or the legacy stream) are written here by a small writer that needs no torch,
then read back, fuzzed (truncated, bit-flipped) and poisoned (pickles naming os.system,
builtins.eval, a model class; tensors whose strides leave their storage). The comparison with
torch.load(weights_only=True) on real checkpoints is in tests/torch/test_audit_torchfile.py."""

import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanscope.audit import inspect
from nanscope.audit.torchfile import LEGACY_MAGIC, NeedsTorch, read_pt, read_torch_file
from nanscope.cli.main import main
from nanscope.core.errors import BadInputError


class G:
    """The global ``module.name``, written into the pickle without importing it."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __reduce__(self):
        return self.name

    def __call__(self, *args):  # pickle wants a callable in a reduce tuple; never called
        raise AssertionError("not called")


class Call:
    """Pickles as ``func(*args)`` (REDUCE)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Storage:
    def __init__(self, key, type_name, raw, numel):
        self.key, self.type_name, self.raw, self.numel = key, type_name, raw, numel


class _Pickler(pickle._Pickler):
    def __init__(self, file, legacy=False):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def save_global(self, obj, name=None):
        if isinstance(obj, G):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            pid = ("storage", G("torch", obj.type_name), obj.key, "cpu", obj.numel)
            return pid + (None,) if self.legacy else pid
        return None


_TYPES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
    np.dtype(np.int8): "CharStorage",
}


class Writer:
    """Tensors as torch.save writes them: one storage each (or shared), rebuilt by _rebuild_tensor_v2."""

    def __init__(self):
        self.storages = []

    def storage(self, flat, type_name=None):
        flat = np.ascontiguousarray(flat).reshape(-1)
        s = Storage(
            str(len(self.storages)), type_name or _TYPES[flat.dtype], flat.tobytes(), flat.size
        )
        self.storages.append(s)
        return s

    def tensor(
        self, a, *, storage=None, offset=0, size=None, stride=None, parameter=False, bfloat16=False
    ):
        a = np.asarray(a)
        if storage is None:
            if bfloat16:
                bits = (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)
                storage = self.storage(bits, "BFloat16Storage")
            else:
                storage = self.storage(a)
        size = tuple(a.shape) if size is None else size
        if stride is None:
            stride = tuple(int(np.prod(size[i + 1 :], dtype=np.int64)) for i in range(len(size)))
        t = Call(
            G("torch._utils", "_rebuild_tensor_v2"),
            storage,
            offset,
            size,
            stride,
            False,
            Call(G("collections", "OrderedDict")),
        )
        return (
            Call(
                G("torch._utils", "_rebuild_parameter"),
                t,
                True,
                Call(G("collections", "OrderedDict")),
            )
            if parameter
            else t
        )

    def save(self, path, obj, *, legacy=False, archive="archive"):
        buf = io.BytesIO()
        _Pickler(buf, legacy=legacy).dump(obj)
        if legacy:
            with open(path, "wb") as fh:
                for head in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
                    pickle.dump(head, fh, protocol=2)
                fh.write(buf.getvalue())
                pickle.dump([s.key for s in self.storages], fh, protocol=2)
                for s in self.storages:
                    fh.write(s.numel.to_bytes(8, "little"))
                    fh.write(s.raw)
            return
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr(f"{archive}/data.pkl", buf.getvalue())
            z.writestr(f"{archive}/byteorder", "little")
            for s in self.storages:
                z.writestr(f"{archive}/data/{s.key}", s.raw)
            z.writestr(f"{archive}/version", "3\n")


def _model(poison=False):
    rng = np.random.default_rng(0)
    w = Writer()
    conv = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    var = np.full(4, 0.5, np.float32)
    if poison:
        var[2] = np.nan
    sd = OrderedDict(
        [
            ("conv.weight", w.tensor(conv)),
            ("bn.weight", w.tensor(np.ones(4, np.float32))),
            ("bn.bias", w.tensor(np.zeros(4, np.float32))),
            ("bn.running_mean", w.tensor(np.zeros(4, np.float32))),
            ("bn.running_var", w.tensor(var)),
            ("bn.num_batches_tracked", w.tensor(np.array(3, np.int64))),
            ("fc.weight", w.tensor(np.full((2, 4), 0.1, np.float32))),
        ]
    )
    arrays = {"conv.weight": conv, "bn.running_var": var}
    return w, sd, arrays


def test_state_dict_values_dtypes_and_findings(tmp_path):
    w, sd, arrays = _model(poison=True)
    w.save(tmp_path / "m.pt", sd)
    ck = read_torch_file(tmp_path / "m.pt")
    assert list(ck.tensors) == list(sd) and ck.dtypes["bn.num_batches_tracked"] == "int64"
    assert np.array_equal(ck.tensors["conv.weight"], arrays["conv.weight"])
    assert np.array_equal(ck.tensors["bn.running_var"], arrays["bn.running_var"], equal_nan=True)
    (f,) = inspect(tmp_path / "m.pt").findings
    assert f.category == "corrupt_norm_statistics" and f.where_found["tensor"] == "bn.running_var"
    assert main(["inspect", str(tmp_path / "m.pt")]) == 1


def test_views_shared_storages_bfloat16_and_parameters(tmp_path):
    w = Writer()
    base = np.arange(24, dtype=np.float32)
    s = w.storage(base)
    obj = {
        "slice": w.tensor(None, storage=s, offset=2, size=(3,), stride=(2,)),  # t[2:8:2]
        "transposed": w.tensor(
            None, storage=s, offset=0, size=(6, 4), stride=(1, 6)
        ),  # .t() of (4, 6)
        "broadcast": w.tensor(None, storage=s, offset=5, size=(3, 2), stride=(0, 1)),  # expand
        "empty": w.tensor(None, storage=s, offset=0, size=(0, 5), stride=(5, 1)),
        "scalar": w.tensor(None, storage=s, offset=23, size=(), stride=()),
        "bf16": w.tensor(np.array([1.5, -np.inf, 3.0], np.float32), bfloat16=True),
        "param": w.tensor(np.ones(2, np.float16), parameter=True),
    }
    w.save(tmp_path / "v.pt", obj)
    got = read_pt(tmp_path / "v.pt")
    assert got["slice"].array.tolist() == [2.0, 4.0, 6.0]
    assert np.array_equal(got["transposed"].array, base.reshape(4, 6).T)
    assert got["broadcast"].array.tolist() == [[5.0, 6.0]] * 3 and got["empty"].array.shape == (
        0,
        5,
    )
    assert got["scalar"].array.shape == () and float(got["scalar"]) == 23.0
    assert got["bf16"].dtype == "bfloat16" and got["bf16"].array.dtype == np.float32
    assert got["bf16"].array.tolist() == [1.5, -np.inf, 3.0]
    assert got["param"].dtype == "float16" and got["param"].array.dtype == np.float16
    assert not got["slice"].array.flags.writeable  # views of the mapped file, read-only
    ck = read_torch_file(tmp_path / "v.pt")
    assert ck.dtypes["bf16"] == "bfloat16"


def test_training_checkpoint_optimizer_names_and_hyperparameters(tmp_path):
    w, sd, _ = _model()
    params = [
        k
        for k in sd
        if k.rsplit(".", 1)[-1] not in ("running_mean", "running_var", "num_batches_tracked")
    ]
    sq = np.ones((4, 3, 3, 3), np.float32)
    sq[0, 0, 0, 0] = np.nan
    state = {
        0: {
            "step": w.tensor(np.array(2.0, np.float32)),
            "exp_avg": w.tensor(np.zeros((4, 3, 3, 3), np.float32)),
            "exp_avg_sq": w.tensor(sq),
        }
    }
    opt = {
        "state": state,
        "param_groups": [
            {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "params": list(range(len(params)))}
        ],
    }
    w.save(
        tmp_path / "ck.pt",
        {
            "model": sd,
            "optimizer": opt,
            "epoch": 4,
            "ema": OrderedDict([("w", w.tensor(np.ones(2, np.float32)))]),
        },
    )
    ck = read_torch_file(tmp_path / "ck.pt")
    assert ck.hyper == {"lr": 1e-3, "eps": 1e-8}
    assert set(ck.optimizer) == {
        f"optimizer[conv.weight].{k}" for k in ("step", "exp_avg", "exp_avg_sq")
    }
    assert "ema.w" in ck.tensors
    (f,) = inspect(tmp_path / "ck.pt").findings
    assert (
        f.category == "optimizer_state"
        and f.where_found["tensor"] == "optimizer[conv.weight].exp_avg_sq"
    )


def test_legacy_stream_format(tmp_path):
    w, sd, arrays = _model(poison=True)
    w.save(tmp_path / "old.pt", sd, legacy=True)
    ck = read_torch_file(tmp_path / "old.pt")
    assert list(ck.tensors) == list(sd)
    assert np.array_equal(ck.tensors["conv.weight"], arrays["conv.weight"])
    assert main(["inspect", str(tmp_path / "old.pt")]) == 1


EVIL = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("__builtin__", "eval"),
    ("builtins", "getattr"),
    ("builtins", "open"),
    ("subprocess", "Popen"),
    ("torchvision.models.resnet", "ResNet"),
    ("torch.nn.modules.conv", "Conv2d"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("torch", "load"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("shutil", "rmtree"),
    ("pickle", "loads"),
]


@pytest.mark.parametrize(("module", "name"), EVIL)
def test_other_globals_are_refused_and_never_called(tmp_path, capsys, module, name):
    marker = tmp_path / "pwned"
    w, sd, _ = _model()
    sd["payload"] = Call(G(module, name), f"touch {marker}")
    for legacy in (False, True):
        path = tmp_path / f"evil{legacy}.pt"
        w.save(path, sd, legacy=legacy)
        assert main(["inspect", str(path), "--json", str(tmp_path / "r.json")]) == 2
        err = capsys.readouterr().err
        shown = {"__builtin__": "builtins"}.get(
            module, module
        )  # Python 2 names as Python 3 reads them
        assert err.count("\n") == 1 and f"{shown}.{name}" in err and "--trust-pickle" in err, err
        assert "Traceback" not in err and not marker.exists() and not (tmp_path / "r.json").exists()


def test_plain_pickles_and_protocol_0_are_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = (
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    )  # protocol 0, the classic exploit
    (tmp_path / "p0.pt").write_bytes(payload)
    (tmp_path / "p2.pt").write_bytes(pickle.dumps({"a": [1, 2]}, protocol=2))
    (tmp_path / "zip.pt").write_bytes(b"PK\x03\x04 not a zip")
    with zipfile.ZipFile(tmp_path / "nopkl.pt", "w") as z:
        z.writestr("a/other.txt", "x")
    for name in ("p0.pt", "p2.pt", "zip.pt", "nopkl.pt"):
        assert main(["inspect", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [
        (0, (25,), (1,)),  # one element past the storage of 24
        (20, (5,), (1,)),
        (0, (2, 13), (13, 1)),
        (0, (3,), (-1,)),  # negative stride
        (-1, (2,), (1,)),
        (0, (4, 4), (1,)),  # ranks differ
        (0, (2**40, 2**40), (1, 1)),  # absurd sizes
        (0, (2**40,), (0,)),  # a zero-stride view of 2**40 elements over 24: a denial of service
    ],
)
def test_tensors_outside_their_storage_are_refused(tmp_path, capsys, offset, size, stride):
    w = Writer()
    s = w.storage(np.arange(24, dtype=np.float32))
    w.save(
        tmp_path / "oob.pt",
        {"w": w.tensor(None, storage=s, offset=offset, size=size, stride=stride)},
    )
    with pytest.raises(BadInputError):
        read_torch_file(tmp_path / "oob.pt")
    assert main(["inspect", str(tmp_path / "oob.pt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_quantized_tensors_go_to_torch_or_say_so(tmp_path):
    w = Writer()
    w.save(tmp_path / "q.pt", {"q": Call(G("torch._utils", "_rebuild_qtensor"), 1, 2)})
    with pytest.raises(NeedsTorch):
        read_pt(tmp_path / "q.pt")


def _mutations(data, kind, rng, n):
    for _ in range(n):
        if kind == "truncate":
            yield data[: int(rng.integers(1, len(data)))]
        else:
            b = bytearray(data)
            for _ in range(int(rng.integers(1, 6))):
                i = int(rng.integers(0, len(b)))
                b[i] ^= 1 << int(rng.integers(0, 8))
            yield bytes(b)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("kind", ["truncate", "bitflip"])
def test_fuzzed_files_never_crash(tmp_path, capsys, kind, legacy):
    w, sd, _ = _model(poison=True)
    w.save(tmp_path / "a.pt", {"model": sd, "epoch": 1}, legacy=legacy)
    data = (tmp_path / "a.pt").read_bytes()
    rng = np.random.default_rng(11)
    for trial, mutated in enumerate(_mutations(data, kind, rng, 40)):
        (tmp_path / "f.pt").write_bytes(mutated)
        code = main(["inspect", str(tmp_path / "f.pt")])
        err = capsys.readouterr().err
        assert code in (0, 1, 2) and "internal error" not in err and "Traceback" not in err, (
            trial,
            err,
        )
        if code == 2:
            assert err.count("\n") == 1, err


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 10**6))
def test_arbitrary_pickle_bytes_are_refused_or_read_never_crash(tmp_path_factory, junk, seed):
    """Random bytes after a protocol header, and random splices of a real data.pkl: the reader
    raises BadInputError (or NeedsTorch) or returns, never anything else."""
    tmp = tmp_path_factory.mktemp("h")
    w, sd, _ = _model()
    buf = io.BytesIO()
    _Pickler(buf).dump(sd)
    real = buf.getvalue()
    cut = seed % max(1, len(real))
    for blob in (b"\x80\x02" + junk, real[:cut] + junk + real[cut:]):
        with zipfile.ZipFile(tmp / "h.pt", "w") as z:
            z.writestr("archive/data.pkl", blob)
            for s in w.storages:
                z.writestr(f"archive/data/{s.key}", s.raw)
        try:
            read_torch_file(tmp / "h.pt")
        except (BadInputError, NeedsTorch):
            pass


def test_subprocess_inspect_imports_no_torch(tmp_path):
    w, sd, _ = _model(poison=True)
    w.save(tmp_path / "m.pt", sd)
    code = (
        "import sys; from nanscope.cli.main import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules; sys.exit(rc)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, "inspect", str(tmp_path / "m.pt")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert p.returncode == 1 and p.stderr == "" and "corrupt_norm_statistics" in p.stdout
