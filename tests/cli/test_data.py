"""`nanscope data` and `nanscope.data.audit` on real files the tests write.

Every problem the audit names is planted in a real file: a TIFF with a NaN pixel, a constant
image, a mask of only 255s, a mask with label 21 in a 21-class set, NaN rows in .npy, bad labels
in .npz/.h5. Healthy data must give no finding at all.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from nanscope.cli.main import main
from nanscope.data import audit
from nanscope.data.audit import _audit_part as _real_audit_part

RNG = np.random.default_rng(0)


def _healthy_mask(n_classes=21):
    return (np.arange(16 * 16).reshape(16, 16) % n_classes).astype(np.uint8)


@pytest.fixture
def seg(tmp_path):
    """images/ + masks/ with one NaN TIFF, one constant image, one all-255 mask, one label 21."""
    rng = np.random.default_rng(42)  # its own generator: the same files whatever the test order
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / f"images/{i:04d}.png"
        )
        Image.fromarray(_healthy_mask()).save(root / f"masks/{i:04d}.png")
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(root / "images/0001.png")  # constant
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(root / "masks/0002.png")  # all ignored
    m = _healthy_mask()
    m[0, :4] = 21
    Image.fromarray(m).save(root / "masks/0003.png")  # label 21 of 21 classes
    f = rng.random((16, 16)).astype(np.float32)
    f[3, 3] = np.nan
    Image.fromarray(f).save(root / "images/0005.tif")  # a float TIFF with one NaN pixel
    Image.fromarray(_healthy_mask()).save(root / "masks/0005.png")
    return root


def _by(findings, category, severity="error"):
    return [f for f in findings if f["category"] == category and f["severity"] == severity]


def test_segmentation_folder_names_every_planted_problem(seg, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert (
        main(["data", str(seg), "--num-classes", "21", "--ignore-index", "255", "--json", str(out)])
        == 1
    )
    doc = json.loads(out.read_text())
    assert doc["schema"] == 1 and doc["status"] == "problems"
    f = doc["findings"]
    (nan,) = _by(f, "nonfinite_input")
    assert (
        nan["where"]["file"] == "images/0005.tif"
        and nan["samples"] == [5]
        and nan["phase"] == "data"
    )
    targets = _by(f, "invalid_target")
    (oor,) = [t for t in targets if "outside [0, 21)" in t["summary"]]
    assert oor["where"]["file"] == "masks/0003.png" and oor["samples"] == [3]
    assert any("21 (4 values)" in e for e in oor["evidence"])
    (ign,) = [t for t in targets if "ignore_index 255" in t["summary"] and "0/0" in t["summary"]]
    assert ign["where"]["file"] == "masks/0002.png" and ign["samples"] == [2]
    (const,) = _by(f, "op_domain", "warning")
    assert const["where"]["file"] == "images/0001.png"
    assert len(f) == 4  # nothing else: the healthy files raise nothing
    stats = doc["stats"]
    assert stats["samples"] == 6 and stats["inputs"]["image"]["nan"] == 1
    assert len(stats["inputs"]["image"]["channel_mean"]) == 3
    assert (
        stats["targets"]["mask"]["unused_classes"] == []
        and stats["targets"]["mask"]["ignored"] == 256
    )
    text = capsys.readouterr().out
    assert text.index("[error]") < text.index("[warning]") < text.index("statistics")


def test_healthy_data_is_clean_and_silent(tmp_path, capsys):
    root = tmp_path / "ok"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        Image.fromarray(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / f"images/{i}.jpg"
        )
        Image.fromarray(_healthy_mask(5)).save(root / f"masks/{i}.png")
    assert main(["data", str(root), "--num-classes", "5", "--json", str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["status"] == "clean" and doc["findings"] == []
    x = RNG.standard_normal((50, 3, 8, 8)).astype(np.float32)
    y = RNG.integers(0, 10, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    assert main(["data", str(tmp_path / "d.npz"), "--num-classes", "10"]) == 0
    assert "clean" in capsys.readouterr().out


def test_npy_rows_with_nan_and_unnormalized_floats(tmp_path):
    x = RNG.uniform(0, 255, (40, 8, 8, 3)).astype(np.float32)
    x[[3, 17], 2, 2, 0] = np.nan
    x[9, 0, 0, 1] = np.inf
    np.save(tmp_path / "train_x.npy", x)
    r = audit(tmp_path / "train_x.npy")
    (nan,) = [f for f in r.findings if f.category == "nonfinite_input"]
    assert nan.samples == [3, 9, 17] and "2 NaN, 1 +Inf" in nan.evidence[0]
    (rng,) = [f for f in r.findings if f.category == "overflow"]
    assert rng.severity == "warning" and "0..255" in rng.summary
    assert r.exit_code == 1
    s = r.stats["inputs"]["train_x"]
    assert s["nan"] == 2 and s["posinf"] == 1 and len(s["channel_mean"]) == 3


def test_npz_and_hdf5_labels_out_of_range_and_soft_labels(tmp_path):
    y = np.array([0, 1, 2, 3, -1, 2, 9])
    np.savez(tmp_path / "d.npz", images=RNG.standard_normal((7, 4)).astype(np.float32), labels=y)
    r = audit(tmp_path / "d.npz", num_classes=4)
    (oor,) = [f for f in r.findings if "outside" in f.summary]
    assert oor.samples == [4, 6] and oor.where_found["target"] == "labels"
    with h5py.File(tmp_path / "d.h5", "w") as h:
        h["x"] = RNG.standard_normal((6, 3)).astype(np.float32)
        soft = np.full((6, 3), 1 / 3, np.float32)
        soft[4] = [0.5, 0.2, 0.2]
        h["targets"] = soft
    r = audit(tmp_path / "d.h5")
    (bad,) = [f for f in r.findings if f.category == "invalid_target"]
    assert bad.samples == [4] and "sum to 1" in bad.summary and "0.9" in bad.evidence[0]
    assert r.stats["targets"]["targets"]["kind"] == "soft"


def test_python_api_arrays_and_class_folders(tmp_path):
    x = np.zeros((5, 32), np.float32)
    x += np.arange(32, dtype=np.float32) / 32
    x[2] = 0.5  # constant row
    y = np.array([0, 1, 0, 1, 0])
    r = audit({"x": x, "y": y}, num_classes=3)
    assert [(f.category.value, f.severity) for f in r.findings] == [
        ("op_domain", "warning"),
        ("invalid_target", "warning"),
    ]
    assert (
        r.findings[0].samples == [2]
        and r.findings[1].where_found["classes"] == [2]
        and r.exit_code == 0
    )
    for cls in ("cat", "dog"):
        (tmp_path / "cls" / cls).mkdir(parents=True)
        Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            tmp_path / "cls" / cls / "a.png"
        )
    r = audit(tmp_path / "cls", num_classes=3)
    assert r.stats["targets"]["label"]["histogram"] == {"0": 1, "1": 1, "2": 0}


def _write_bad_files(tmp_path):
    good = RNG.standard_normal((20, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", good)
    np.savez(tmp_path / "a.npz", x=good, y=np.arange(20))
    with h5py.File(tmp_path / "a.h5", "w") as h:
        h["x"] = good
    Image.fromarray(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    return [tmp_path / n for n in ("a.npy", "a.npz", "a.h5", "a.png")]


def test_bad_files_one_line_exit_2_and_no_report(tmp_path, capsys):
    report = tmp_path / "r.json"
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    for bad in ("missing.npy", "empty.npy", "notes.txt", "obj.npy"):
        assert main(["data", str(tmp_path / bad), "--json", str(report)]) == 2, bad
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
        assert not report.exists()
    assert "pickle" in err


@pytest.mark.parametrize("kind", ["truncate", "bitflip"])
def test_fuzzed_files_never_crash(tmp_path, capsys, kind):
    rng = np.random.default_rng(1)
    for path in _write_bad_files(tmp_path):
        data = path.read_bytes()
        for trial in range(12):
            if kind == "truncate":
                mutated = data[: int(rng.integers(1, len(data)))]
            else:
                b = bytearray(data)
                for _ in range(3):
                    i = int(rng.integers(0, len(b)))
                    b[i] ^= 1 << int(rng.integers(0, 8))
                mutated = bytes(b)
            victim = tmp_path / f"fuzz{trial}{path.suffix}"
            victim.write_bytes(mutated)
            code = main(["data", str(victim), "--no-progress"])
            err = capsys.readouterr().err
            assert code in (0, 1, 2), (path.name, trial)
            assert "internal error" not in err and "Traceback" not in err, (path.name, trial, err)
            if code == 2:
                assert err.count("\n") == 1


def test_truncated_image_in_folder_names_the_file(seg, capsys):
    p = seg / "images/0004.png"
    p.write_bytes(p.read_bytes()[:60])
    assert main(["data", str(seg)]) == 2
    assert "0004.png" in capsys.readouterr().err


def test_subprocess_writes_json_and_imports_no_framework(seg, tmp_path):
    out = tmp_path / "r.json"
    code = (
        "import sys; from nanscope.cli.main import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules; sys.exit(rc)"
    )
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "data",
            str(seg),
            "--num-classes",
            "21",
            "--ignore-index",
            "255",
            "--json",
            str(out),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 1 and p.stderr == "", p.stderr
    assert {f["category"] for f in json.loads(out.read_text())["findings"]} == {
        "nonfinite_input",
        "invalid_target",
        "op_domain",
    }
    p = subprocess.run(
        [sys.executable, "-m", "nanscope", "data", str(seg), "--workers", "0"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1


def test_progress_bar_only_when_asked(seg, capsys):
    audit(seg, progress=True)
    assert "nanscope data: " in capsys.readouterr().err
    audit(seg)  # stderr is not a terminal under pytest: no bar
    assert capsys.readouterr().err == ""


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 30), st.integers(1, 6)),
        elements=st.one_of(
            st.floats(-10, 10, width=32), st.sampled_from([np.nan, np.inf, -np.inf])
        ),
    ),
    st.integers(1, 5),
)
def test_nonfinite_samples_match_a_reference(x, rows_per_chunk):
    import nanscope.data.readers as readers

    old = readers.CHUNK_BYTES
    readers.CHUNK_BYTES = (
        rows_per_chunk * x.shape[1] * 4
    )  # several chunks: indices must stay global
    try:
        r = audit(x, progress=False)
    finally:
        readers.CHUNK_BYTES = old
    want = [int(i) for i in np.flatnonzero(~np.isfinite(x).all(axis=1))]
    got = [f.samples for f in r.findings if f.category == "nonfinite_input"]
    assert got == ([want] if want else [])
    assert r.stats["inputs"]["x"]["nan"] == int(np.isnan(x).sum())


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(
        np.int64, st.tuples(st.integers(1, 20), st.integers(1, 5)), elements=st.integers(-2, 6)
    ),
    st.integers(1, 6),
)
def test_label_checks_match_a_reference(y, num_classes):
    ignore = -1
    x = np.zeros((y.shape[0], 2), np.float32) + np.arange(2, dtype=np.float32)
    r = audit({"x": x, "y": y}, num_classes=num_classes, ignore_index=ignore, progress=False)
    valid = y != ignore
    bad = valid & ((y < 0) | (y >= num_classes))
    want_rows = [int(i) for i in np.flatnonzero(bad.any(axis=1))]
    got = [f.samples for f in r.findings if "outside" in f.summary]
    assert got == ([want_rows] if want_rows else [])
    good = y[valid & ~bad]
    hist = np.bincount(good, minlength=num_classes)
    assert r.stats["targets"]["y"]["histogram"] == {
        str(c): int(hist[c]) for c in range(num_classes)
    }
    all_ignored = [int(i) for i in np.flatnonzero(~valid.any(axis=1))] if y.shape[1] > 1 else []
    assert [f.samples for f in r.findings if "0/0" in f.summary] == (
        [all_ignored] if all_ignored else []
    )


GOLDEN = Path(__file__).parent / "golden" / "data_seg.txt"


def test_text_report_matches_golden_file(seg, capsys):
    """The rendered report (problems first, then statistics); NANSCOPE_UPDATE_GOLDEN=1 rewrites it."""
    main(["data", str(seg), "--num-classes", "21", "--ignore-index", "255"])
    text = capsys.readouterr().out
    if os.environ.get("NANSCOPE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_npy_samples_in_an_image_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            folder / f"{i:04d}.png"
        )
    x = rng.random((8, 8, 3)).astype(np.float32)
    x[1, 1, 1] = np.inf
    np.save(folder / "0003.npy", x)
    (f,) = audit(folder).findings
    assert (
        f.category == "nonfinite_input" and f.where_found["file"] == "0003.npy" and f.samples == [3]
    )
    assert "1 +Inf" in f.evidence[0]


def _close(a, b, path="", rel=1e-9):
    """Reports equal up to float rounding (merge order): counts, names and findings exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=rel), path
    else:
        assert a == b, path


@pytest.fixture
def big_seg(tmp_path):
    """70 image/mask pairs (more than two process tasks), problems planted far apart, mixed
    modes: RGB and RGBA PNGs (histogram path), a float TIFF with NaN (array path), a constant."""
    rng = np.random.default_rng(7)
    root = tmp_path / "big"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(70):
        img = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"images/{i:04d}.png")
        Image.fromarray(_healthy_mask()).save(root / f"masks/{i:04d}.png")
    Image.fromarray(np.full((12, 10, 3), 9, np.uint8)).save(root / "images/0003.png")  # constant
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(root / "masks/0040.png")  # all ignored
    f = rng.random((12, 10)).astype(np.float32)
    f[2, 2] = np.nan
    (root / "images/0066.png").unlink()
    Image.fromarray(f).save(root / "images/0066.tif")
    (root / "images/0050.png").unlink()
    Image.fromarray(rng.integers(0, 256, (12, 10, 4), dtype=np.uint8), "RGBA").save(
        root / "images/0050.png"
    )
    return root


def test_worker_processes_give_the_one_worker_report(big_seg):
    import nanscope.data.readers as readers

    assert readers.can_fork()  # the core suite imports no framework: the process path runs
    one = audit(big_seg, num_classes=21, ignore_index=255, workers=1).to_dict()
    two = audit(big_seg, num_classes=21, ignore_index=255, workers=2).to_dict()
    _close(one, two)
    f = one["findings"]
    assert [(x["category"], x["samples"]) for x in f] == [
        ("nonfinite_input", [66]),
        ("op_domain", [3]),
        ("invalid_target", [40]),
    ]
    assert f[0]["where"]["file"] == "images/0066.tif" and f[1]["where"]["file"] == "images/0003.png"
    s = one["stats"]["inputs"]["image"]
    assert s["nan"] == 1 and s["count"] == 70 * 12 * 10 * 3 - 12 * 10 * 3 + 12 * 10 + 12 * 10 * 1
    assert len(s["channel_mean"]) == 3 and s["sample_shape"] == "varies"


def test_worker_processes_stop_at_the_first_bad_file(big_seg, capsys):
    for name in ("images/0045.png", "images/0060.png"):
        p = big_seg / name
        p.write_bytes(p.read_bytes()[:50])
    for workers in ("1", "2"):
        assert main(["data", str(big_seg), "--workers", workers]) == 2
        err = capsys.readouterr().err
        assert "0045.png" in err and "0060.png" not in err and err.count("\n") == 1, err


def _crash_from_32(
    files, start, template
):  # a worker whose decoder crashes the process (a native bug)
    if start >= 32:
        os._exit(3)
    return _real_audit_part(files, start, template)


def test_a_crashed_worker_process_is_one_line_exit_2(monkeypatch, big_seg, capsys):
    audit_module = sys.modules[
        "nanscope.data.audit"
    ]  # the module (nanscope.data.audit is the function)
    monkeypatch.setattr(
        audit_module, "_audit_part", _crash_from_32
    )  # forked workers inherit the patch
    assert main(["data", str(big_seg), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "died" in err and "--workers 1" in err, err
    # ranges still in flight when the pool broke fail with it: the named file is at or before the crash
    named = int(re.search(r"images/(\d{4})\.png", err).group(1))
    assert 1 <= named <= 33, err


def test_no_fork_with_a_framework_loaded(monkeypatch, big_seg):
    import types

    import nanscope.data.readers as readers

    monkeypatch.setitem(sys.modules, "jax", types.ModuleType("jax"))
    assert not readers.can_fork()  # threads then: the same report
    _close(audit(big_seg, workers=2).to_dict(), audit(big_seg, workers=1).to_dict())


def test_histogram_statistics_match_numpy(tmp_path):
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 256, (4, 20, 18, 3), dtype=np.uint8)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    s = audit(tmp_path).stats["inputs"]["image"]
    want = imgs.astype(np.float64)
    assert s["count"] == want.size and s["min"] == want.min() and s["max"] == want.max()
    assert s["mean"] == pytest.approx(want.mean(), rel=1e-12) and s["std"] == pytest.approx(
        want.std(), rel=1e-12
    )
    assert s["channel_mean"] == pytest.approx(want.mean(axis=(0, 1, 2)).tolist(), rel=1e-12)
    assert s["channel_std"] == pytest.approx(want.std(axis=(0, 1, 2)).tolist(), rel=1e-12)


@pytest.mark.parametrize("layout", ["first", "last"])
def test_npy_images_per_channel_per_sample_in_one_pass(tmp_path, layout):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((300, 3, 16, 16)) * [[[2.0]], [[5.0]], [[9.0]]] + 100).astype(
        np.float32
    )
    x[17] = 0.25  # constant sample
    x[250, 1, 3, 3] = np.nan
    x[251, 2, 0, :4] = -np.inf
    if layout == "last":
        x = np.ascontiguousarray(np.moveaxis(x, 1, 3))
    np.save(tmp_path / "x.npy", x)
    import nanscope.data.readers as readers

    old = readers.CHUNK_BYTES
    readers.CHUNK_BYTES = 7 * x[0].nbytes  # many chunks, samples numbered globally
    try:
        r = audit(tmp_path / "x.npy", workers=2)
    finally:
        readers.CHUNK_BYTES = old
    (nan,) = [f for f in r.findings if f.category == "nonfinite_input"]
    assert nan.samples == [250, 251]
    assert nan.evidence == [
        "x: 1 NaN, 4 -Inf of 230400 values",
        "sample 250: 1 non-finite of 768",
        "sample 251: 4 non-finite of 768",
    ]
    (const,) = [f for f in r.findings if f.category == "op_domain"]
    assert const.samples == [17]
    s = r.stats["inputs"]["x"]
    ax = (0, 2, 3) if layout == "first" else (0, 1, 2)
    finite = np.where(np.isfinite(x), x, np.nan).astype(np.float64)
    assert s["channel_mean"] == pytest.approx(np.nanmean(finite, axis=ax).tolist(), rel=1e-6)
    assert s["channel_std"] == pytest.approx(np.nanstd(finite, axis=ax).tolist(), rel=1e-5)
    assert (s["nan"], s["neginf"], s["min"], s["max"]) == (
        1,
        4,
        float(np.nanmin(finite)),
        float(np.nanmax(finite)),
    )


def test_worker_processes_when_the_first_file_has_no_mask(big_seg):
    (big_seg / "masks/0000.png").unlink()  # the mask's decisions come from a later range
    m = _healthy_mask()
    m[0, 0] = 30
    Image.fromarray(m).save(big_seg / "masks/0055.png")
    one = audit(big_seg, num_classes=21, ignore_index=255, workers=1).to_dict()
    two = audit(big_seg, num_classes=21, ignore_index=255, workers=2).to_dict()
    _close(one, two)
    assert one["stats"]["targets"]["mask"]["valid"] == 68 * 256  # 69 masks, one all ignore_index
    assert [f["samples"] for f in one["findings"] if "outside" in f["summary"]] == [[55]]


def test_hits_merged_in_order_equal_hits_added_one_by_one():
    from nanscope.data.rules import MAX_LISTED, MAX_NAMED, Hits

    one, parts = Hits(), [Hits() for _ in range(7)]
    for i in range(2 * MAX_LISTED + 11):
        one.add(i, f"f{i}" if i % 3 else None, f"note {i}")
        parts[i * 7 // (2 * MAX_LISTED + 11)].add(i, f"f{i}" if i % 3 else None, f"note {i}")
    merged = Hits()
    for p in parts:
        merged.merge(p)
    assert merged == one and len(one.samples) == MAX_LISTED and len(one.files) == MAX_NAMED


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        hnp.arrays(
            np.uint8,
            st.tuples(st.integers(1, 9), st.integers(1, 9)),
            elements=st.sampled_from([0, 1, 2, 3, 5, 20, 21, 200, 255]),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([None, 3, 21]),
    st.sampled_from([None, 255, 0]),
)
def test_mask_value_counts_give_the_pixel_checks(masks, num_classes, ignore_index):
    """A mask checked from its Pillow histogram (in the worker) says what its pixels say."""
    from nanscope.data.audit import _TargetAudit
    from nanscope.data.samples import label_counts

    by_counts = _TargetAudit("mask", num_classes, ignore_index)
    by_pixels = _TargetAudit("mask", num_classes, ignore_index)
    for i, m in enumerate(masks):
        by_counts.update(label_counts(Image.fromarray(m, "L")), i, [f"m{i}.png"])
        by_pixels.update(m[None], i, [f"m{i}.png"])
    _close(
        by_counts.to_dict(), by_pixels.to_dict(), rel=1e-6
    )  # the pixel path sums 8-bit values in float32
    for f in ("nonfinite", "out_of_range", "all_ignored", "bad_soft"):
        assert getattr(by_counts, f) == getattr(by_pixels, f), f
    assert (
        by_counts.bad_values == by_pixels.bad_values and by_counts.above_cap == by_pixels.above_cap
    )
