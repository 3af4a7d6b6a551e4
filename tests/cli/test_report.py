"""`nanscope report` and `--html`: one self-contained page per diagnosis or audit, opened in a
real headless Chromium (Debian's `chromium`; the browser tests skip without it).

The pages come from one diagnosis of each category (report_fixtures/*.json: the JSON of real
`nanscope run` failures of tests/torch/scenarios, paths made relative, plus a Keras-shaped
`unknown`; a loss-scale collapse, compiled_numerics and transient built by the real rules),
from a real `nanscope run` of a scenario, from a real Guard bundle (with its samples preview),
and from `nanscope data` and `nanscope inspect` on files written here. Each is checked in the
browser: no console error, the key elements present and visible, images decoded, a screenshot
that is not blank.

Set NANSCOPE_REPORT_SCREENSHOTS=docs/img to (re)write the README's screenshots.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanscope.cli.main import main
from nanscope.core.rules import loss_scale_collapse
from nanscope.report import render
from nanscope.report.console import use_rich
from nanscope.report.images import BAD_RGB, image_thumb, mask_thumb

sys.path.insert(0, str(Path(__file__).parent))
from report_browser import Browser, find_chromium  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "report_fixtures"
SCENARIOS = REPO / "tests" / "torch" / "scenarios"
PYTHON = sys.executable
SCREENSHOTS = os.environ.get("NANSCOPE_REPORT_SCREENSHOTS")
CATEGORIES = [
    "nonfinite_input",
    "invalid_target",
    "op_domain",
    "overflow",
    "singular_gradient",
    "exploding_gradients",
    "nonfinite_parameters",
    "corrupt_norm_statistics",
    "optimizer_state",
    "all_masked_softmax",
    "unknown",
    "compiled_numerics",
    "transient",
]

# Which elements must be visible: every page has the category, the summary and the fixes; a page
# whose failure has a line of code shows it; plots where the evidence has the numbers for one.
VISIBLE_JS = """
(function(sel){
  return Array.prototype.map.call(document.querySelectorAll(sel), function(e){
    var r = e.getBoundingClientRect(), s = getComputedStyle(e);
    var shown = r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none';
    if (e.tagName === 'IMG') { shown = shown && e.complete && e.naturalWidth > 0; }
    return shown;
  });
})(%s)
"""


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        pytest.skip(
            "chromium is not installed: `apt-get install -y chromium` to run the report's browser tests"
        )
    b = Browser(timeout=30)
    yield b
    b.close()


def visible(page, selector: str) -> list[bool]:
    return page.eval(VISIBLE_JS % json.dumps(selector))


def assert_visible(page, selector: str, at_least: int = 1) -> None:
    shown = visible(page, selector)
    assert sum(shown) >= at_least, (
        f"{selector}: {sum(shown)} of {len(shown)} visible, expected >= {at_least}"
    )


def assert_not_blank(png: bytes) -> None:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    a = np.asarray(img)
    assert a.shape[0] >= 600 and a.shape[1] >= 1000
    ink = (a < 235).any(axis=-1).mean()  # not background
    colors = len(np.unique(a.reshape(-1, 3)[::7], axis=0))
    assert ink > 0.02 and colors > 30, f"screenshot looks blank: {ink:.1%} ink, {colors} colours"


def open_checked(browser, path: Path, name: str | None = None):
    page = browser.open(path.resolve().as_uri())
    assert page.errors == []
    png = page.screenshot()
    assert_not_blank(png)
    if SCREENSHOTS and name:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        (Path(SCREENSHOTS) / name).write_bytes(page.screenshot(full=True, max_height=2200))
    return page


def self_contained(page_html: str) -> None:
    """Nothing on the page is fetched: every src / href / url() is inline or a fragment."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']|url\(([^)]*)\)""", page_html)
    for a, b in refs:
        ref = (a or b).strip("'\" ")
        assert ref.startswith(("data:", "#")) or ref == "", ref
    assert "http://" not in page_html.split('<script type="application/json"')[0].replace(
        "http://www.w3.org", ""
    )


def loss_scale_doc() -> dict:
    scales = [65536.0 / 2**i for i in range(20)]
    d = loss_scale_collapse(
        scales, list(range(20)), bad_parameters=["encoder.weight"], framework="torch", step=19
    )
    return d.to_dict()


def fixture_doc(category: str) -> dict:
    if category in ("compiled_numerics", "transient"):  # the real rule: the replay stayed finite
        from nanscope.core.rules import not_reproduced

        return not_reproduced(
            "loss",
            step=3,
            phase="forward",
            samples=[1],
            compiled="train_step" if category == "compiled_numerics" else None,
        ).to_dict()
    return json.loads((FIXTURES / f"{category}.json").read_text())


# -- one diagnosis of each category, in the browser ---------------------------------------------


@pytest.mark.parametrize("category", CATEGORIES + ["overflow_loss_scale"])
def test_each_category_renders_and_shows_its_key_elements(browser, tmp_path, category, monkeypatch):
    monkeypatch.chdir(REPO)  # the fixtures' source paths are relative to the repository
    doc = loss_scale_doc() if category == "overflow_loss_scale" else fixture_doc(category)
    src = tmp_path / "nan.json"
    src.write_text(json.dumps(doc))
    assert main(["report", str(src), "-o", str(tmp_path / "nan.html")]) == 0
    html_text = (tmp_path / "nan.html").read_text()
    self_contained(html_text)
    page = open_checked(browser, tmp_path / "nan.html")
    d = doc["diagnosis"]
    assert page.eval("document.querySelector('#category').textContent").startswith(d["category"])
    assert_visible(page, "#category")
    assert_visible(page, "#summary")
    assert page.eval("document.querySelectorAll('#fixes li').length") == len(d["fixes"])
    assert_visible(page, "#fixes li", len(d["fixes"]))
    assert_visible(page, "#travel .path .node", 2)
    loc = d.get("location")
    if loc and (REPO / loc["file"]).is_file():
        assert_visible(page, "#culprit-line")
        line = (REPO / loc["file"]).read_text().splitlines()[loc["line"] - 1]
        assert (
            page.eval("document.querySelector('#culprit-line').textContent")
            == f"{loc['line']}{line}"
        )
    elif loc:
        assert "not readable on this machine" in page.eval(
            "document.querySelector('#where').textContent"
        )
    expected_plot = {
        "exploding_gradients": "#plot-history",
        "overflow": "#plot-headroom",
        "overflow_loss_scale": "#plot-loss-scale",
        "unknown": "#plot-history",
    }.get(category)
    if expected_plot:
        assert_visible(page, expected_plot + " img")
    if category == "corrupt_norm_statistics":
        assert_visible(page, "#norm-layers tr.bad")
    if any(": float" in e for e in d["evidence"]):
        assert_visible(page, "#input-stats tbody tr")
    if (
        category == "overflow"
    ):  # the producer's Inf output is drawn past the float16 line, in the table in red
        assert page.eval("document.querySelectorAll('#input-stats td.bad').length") >= 1
    page.close()


# -- real runs ------------------------------------------------------------------------------------


def test_real_run_exploding_gradients_page(browser, tmp_path):
    """`nanscope run --json --html` on a scenario whose gradients really explode."""
    out_json, out_html = tmp_path / "run.json", tmp_path / "run.html"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "nanscope.cli.main",
            "run",
            "--json",
            str(out_json),
            "--html",
            str(out_html),
            str(SCENARIOS / "lr_high.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"HTML report written to {out_html}" in proc.stderr
    assert "\x1b[" not in proc.stderr  # piped: plain text
    doc = json.loads(out_json.read_text())
    assert doc["diagnosis"]["category"] == "exploding_gradients"
    page_html = out_html.read_text()
    self_contained(page_html)
    page = open_checked(browser, out_html, "report-failure.png")
    assert_visible(page, "#plot-history img")
    assert (
        page.eval("document.querySelector('#culprit-line').textContent")
        .strip()
        .endswith("loss = ((model(x) - y) ** 2).mean()")
    )
    assert page.eval("document.querySelector('#fixes li').textContent").startswith(
        "lower the learning rate"
    )
    assert (
        page.eval("JSON.parse(document.getElementById('nanscope-data').textContent).diagnosis.step")
        == doc["diagnosis"]["step"]
    )
    page.close()
    # The same page from the JSON alone (`nanscope report`), byte for byte.
    assert main(["report", str(out_json), "-o", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text() == page_html


GUARD_SCRIPT = """
import sys, warnings
sys.path.insert(0, {scenarios!r})
import nan_input
from nanscope.torch import Guard
s = nan_input.build()
guard = Guard(s.model, s.optimizer, policy="skip", reports={reports!r})
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for batch in s.batches:
        guard.step(s.train_step, batch)
print(guard.last.bundle)
"""


def test_real_guard_bundle_shows_the_bad_image_with_its_pixel_marked(browser, tmp_path):
    """A Guard run whose batch holds a NaN pixel writes a bundle; its page shows the image."""
    code = GUARD_SCRIPT.format(scenarios=str(SCENARIOS), reports=str(tmp_path / "reports"))
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bundle = Path(proc.stdout.strip().splitlines()[-1])
    assert (bundle / "samples.npz").is_file()
    assert main(["report", str(bundle)]) == 0  # default: BUNDLE/report.html
    page = open_checked(browser, bundle / "report.html")
    assert page.eval("document.querySelector('#category').textContent").startswith(
        "nonfinite_input"
    )
    assert_visible(page, "#samples img.thumb.image")
    assert (
        page.eval("document.querySelector('#samples .sample').getAttribute('data-sample')") == "5"
    )
    assert "1 non-finite pixel" in page.eval("document.querySelector('#samples').textContent")
    assert_visible(page, "#bundle")
    page.close()
    assert main(["show", str(bundle), "--html", str(tmp_path / "show.html")]) == 0
    assert 'data-sample="5"' in (tmp_path / "show.html").read_text()
    # the report never loads state.pt: a bundle whose state is garbage still renders
    (bundle / "state.pt").write_bytes(b"not a torch file")
    assert main(["report", str(bundle), "-o", str(tmp_path / "b.html")]) == 0


@pytest.fixture
def seg_folder(tmp_path):
    """images/ + masks/: a NaN pixel in a float TIFF, a constant image, an all-255 mask, label 21."""
    rng = np.random.default_rng(7)
    root = tmp_path / "seg"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.indices((48, 48))
    for i in range(8):
        img = rng.integers(0, 90, (48, 48, 3), dtype=np.uint8)
        m = np.zeros((48, 48), np.uint8)
        disc = (yy - 12 - 3 * i) ** 2 + (xx - 24) ** 2 < 100
        m[disc] = 1 + i % 4
        img[disc] += 120
        m[:3] = 255
        if i == 5:
            f = (img[..., 0] / 255).astype(np.float32)
            f[20:23, 30:33] = np.nan
            Image.fromarray(f).save(root / f"images/{i:04d}.tif")
        else:
            Image.fromarray(img).save(root / f"images/{i:04d}.png")
        if i == 2:
            m[:] = 255
        if i == 3:
            m[40:, :8] = 21
        Image.fromarray(m).save(root / f"masks/{i:04d}.png")
    Image.fromarray(np.full((48, 48, 3), 9, np.uint8)).save(root / "images/0001.png")
    return root


def test_data_audit_page_with_sortable_findings_histogram_and_thumbnails(
    browser, tmp_path, seg_folder, capsys
):
    out_html, out_json = tmp_path / "data.html", tmp_path / "data.json"
    rc = main(
        [
            "data",
            str(seg_folder),
            "--num-classes",
            "21",
            "--ignore-index",
            "255",
            "--json",
            str(out_json),
            "--html",
            str(out_html),
        ]
    )
    assert rc == 1
    assert f"HTML report written to {out_html}" in capsys.readouterr().out
    page_html = out_html.read_text()
    self_contained(page_html)
    page = open_checked(browser, out_html, "report-data.png")
    n = len(json.loads(out_json.read_text())["findings"])
    assert page.eval("document.querySelectorAll('#findings tbody tr').length") == n
    assert_visible(page, "#findings tbody tr", n)
    assert_visible(page, "img.thumb.image", 3)
    assert_visible(page, "img.thumb.mask", 3)
    text = page.eval("document.querySelector('#samples').textContent")
    assert (
        "0 of 2304 valid (all ignore_index)" in text
        and "out of range" in text
        and "non-finite pixel" in text
    )
    assert_visible(page, "#histogram img")
    # the table sorts when a header is clicked (and the script logs nothing)
    col = ["#", "severity", "category", "summary", "where", "samples (n)", "samples"].index(
        "category"
    )
    before = page.eval(
        f"Array.from(document.querySelectorAll('#findings tbody tr')).map(r => r.cells[{col}].textContent)"
    )
    page.eval(f"document.querySelectorAll('#findings th')[{col}].click()")
    after = page.eval(
        f"Array.from(document.querySelectorAll('#findings tbody tr')).map(r => r.cells[{col}].textContent)"
    )
    assert after == sorted(before) and after != before
    page.eval(f"document.querySelectorAll('#findings th')[{col}].click()")
    assert page.eval(
        f"Array.from(document.querySelectorAll('#findings tbody tr')).map(r => r.cells[{col}].textContent)"
    ) == sorted(before, reverse=True)
    page.eval("document.querySelector('button.copy').click()")
    assert page.errors == []
    page.close()
    # `nanscope report` on the audit's JSON: the same findings; thumbnails only with --data
    assert main(["report", str(out_json), "-o", str(tmp_path / "r1.html")]) == 0
    assert 'img class="thumb' not in (tmp_path / "r1.html").read_text()
    assert (
        main(["report", str(out_json), "--data", str(seg_folder), "-o", str(tmp_path / "r2.html")])
        == 0
    )
    assert (tmp_path / "r2.html").read_text().count('class="thumb mask"') >= 3


def test_inspect_page_marks_the_bad_batchnorm_channels(browser, tmp_path, capsys):
    from nanscope.audit.checkpoint import write_safetensors

    var = np.ones(32, np.float32)
    var[[3, 17]] = [np.nan, -4.0]
    ck = tmp_path / "model.safetensors"
    write_safetensors(
        ck,
        {
            "backbone.bn1.running_mean": np.zeros(32, np.float32),
            "backbone.bn1.running_var": var,
            "backbone.conv1.weight": np.full((32, 3, 3, 3), 0.1, np.float32),
            "head.weight": np.full((4, 32), 9e4, np.float32),
        },
    )
    assert main(["inspect", str(ck), "--html", str(tmp_path / "ck.html")]) == 1
    capsys.readouterr()
    page = open_checked(browser, tmp_path / "ck.html")
    assert_visible(page, "#norm-layers img.strip", 2)
    text = page.eval("document.querySelector('#norm-layers').textContent")
    assert "running_var: 32 channels, 2 bad: channel 3 (nan), 17 (-4)" in text
    assert_visible(page, "#plot-headroom img")
    assert page.eval("document.querySelectorAll('#layers tbody tr').length") == 3
    page.close()


# -- without a browser ----------------------------------------------------------------------------


def test_thumbnails_mark_nonfinite_pixels_and_ignored_masks():
    x = np.zeros((3, 16, 16), np.float32)
    x[1, 7, 9] = np.nan
    t = image_thumb(x, caption="x")
    assert t.bad == 1 and t.caption == "x · 1 non-finite pixel" and (t.width, t.height) == (16, 16)
    px = np.asarray(
        Image.open(io.BytesIO(__import__("base64").b64decode(t.uri.split(",", 1)[1]))).convert(
            "RGB"
        )
    )
    assert tuple(px[7, 9]) == BAD_RGB and tuple(px[0, 0]) != BAD_RGB
    m = mask_thumb(np.full((8, 8), 255, np.uint8), ignore_index=255, num_classes=4)
    assert m.caption == "0 of 64 valid (all ignore_index)" and m.bad == 0
    m = mask_thumb(np.array([[0, 1], [7, 255]] * 2, np.int64), ignore_index=255, num_classes=4)
    assert m.bad == 2 and "2 out of range" in m.caption
    big = image_thumb(np.random.default_rng(0).random((600, 300)))
    assert max(big.width, big.height) <= 128


def test_report_of_json_alone_without_the_source_file(tmp_path):
    doc = fixture_doc("op_domain")
    doc["diagnosis"]["location"]["file"] = "/elsewhere/train.py"
    page = render(doc)
    assert "source file /elsewhere/train.py is not readable on this machine" in page
    assert "op_domain" in page and '<ol class="fixes"' in page
    assert len(page.encode()) < 200_000


def test_report_bad_input_is_one_line_exit_2(tmp_path, capsys):
    good = tmp_path / "nan.json"
    good.write_text(json.dumps(fixture_doc("op_domain")))
    (tmp_path / "foreign.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    cases = [
        ["report", str(tmp_path / "missing.json")],
        ["report", str(tmp_path / "foreign.json")],
        ["report", str(tmp_path / "broken.json")],
        ["report", str(tmp_path / "binary.json")],
        ["report", str(good), "-o", str(good)],  # never over the input
        ["report", str(good), "-o", str(tmp_path / "no" / "such" / "dir.html")],
        ["report", str(good), "--data", str(tmp_path)],  # --data is for audits
        ["report", str(tmp_path)],  # a folder that is not a bundle
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("nanscope: error: "), (argv, err)
    assert json.loads(good.read_text())["diagnosis"]["category"] == "op_domain"
    assert main(["report", str(good)]) == 0 and (tmp_path / "nan.html").is_file()
    assert "wrote" in capsys.readouterr().out


def test_clean_run_page(tmp_path):
    (tmp_path / "ok.json").write_text(
        json.dumps({"schema": 1, "status": "clean", "framework": "torch", "diagnosis": None})
    )
    assert main(["report", str(tmp_path / "ok.json")]) == 0
    page = (tmp_path / "ok.html").read_text()
    assert "nothing non-finite happened" in page and 'class="top clean"' in page


def test_run_html_of_a_clean_script(tmp_path, capsys):
    script = tmp_path / "fine.py"
    script.write_text("print('training went fine')\n")
    assert main(["run", "--html", str(tmp_path / "run.html"), str(script)]) == 0
    assert "HTML report written to" in capsys.readouterr().err
    assert "nothing non-finite happened" in (tmp_path / "run.html").read_text()
    assert main(["run", "--html", str(tmp_path / "missing" / "x.html"), str(script)]) == 2
    assert "cannot write HTML report" in capsys.readouterr().err


def test_terminal_is_plain_when_piped_or_no_color(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    for var in ("NO_COLOR", "CI", "TERM"):
        monkeypatch.delenv(var, raising=False)
    assert use_rich(io.StringIO()) is False
    assert use_rich(Tty()) is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_rich(Tty()) is False
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("CI", "true")
    assert use_rich(Tty()) is False


def test_report_imports_no_framework(tmp_path):
    """Rendering (bundle with a samples preview included) never imports torch or tensorflow."""
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "state.pt").write_bytes(b"opaque")
    doc = fixture_doc("nonfinite_input")
    doc["bundle"] = {
        "format": 1,
        "state_file": "state.pt",
        "state_bytes": 6,
        "samples_file": "samples.npz",
    }
    (bundle / "diagnosis.json").write_text(json.dumps(doc))
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    x[0, 1, 7, 9] = np.nan
    np.savez_compressed(
        bundle / "samples.npz", samples=np.array([5]), **{"batch[0]": x, "batch[1]": np.array([2])}
    )
    code = textwrap.dedent(f"""
        import sys
        from nanscope.cli.main import main
        assert main(["report", {str(bundle)!r}, "-o", {str(tmp_path / "p.html")!r}]) == 0
        bad = [m for m in ("torch", "tensorflow", "keras", "jax") if m in sys.modules]
        assert not bad, bad
    """)
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "p.html").read_text()
    assert 'data-sample="5"' in page and "1 non-finite pixel" in page and "batch[1]: <b" in page


@pytest.mark.parametrize(
    "module",
    [
        "nanscope.report",
        "nanscope.report.images",
        "nanscope.report.failure",
        "nanscope.report.console",
        "nanscope.report.explain",
    ],
)
def test_report_docstring_examples(module):
    """The core suite's --doctest-modules does not cover src/nanscope/report: run its examples here."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_samples_of_tabular_rows_and_token_sequences():
    from nanscope.report.samples import from_arrays
    from nanscope.report.samples import render as render_samples

    rows = np.arange(24, dtype=np.float32).reshape(4, 6)
    rows[2, [1, 4]] = [np.nan, np.inf]
    tokens = np.arange(4 * 10).reshape(4, 10) % 7
    views = from_arrays({'batch["features"]': rows[[2]], 'batch["input_ids"]': tokens[[2]]}, [2])
    html_text = render_samples(views)
    assert len(views) == 1 and views[0].index == 2 and not views[0].thumbs
    assert html_text.count('class="num bad"') == 2 and "2 non-finite (highlighted)" in html_text
    assert "10 tokens" in html_text and '<span title="position 9">' in html_text


def test_path_recorded_by_an_adapter_is_shown_as_is():
    from nanscope.core.diagnosis import Diagnosis
    from nanscope.report.failure import path_nodes

    d = Diagnosis(
        "op_domain",
        "log of 0",
        phase="loss",
        op="aten::log",
        details={
            "path": [
                {"op": "aten::log", "module": "head", "phase": "loss"},
                "aten::mean",
                "aten::add",
            ],
            "reached": "loss",
        },
    )
    assert [t for t, _, _ in path_nodes(d)] == ["aten::log", "aten::mean", "aten::add", "the loss"]
    assert path_nodes(d)[0] == ("aten::log", "head · loss", "origin")
    assert "drawn from the producer" not in render(d)


def test_without_matplotlib_the_numbers_stay_and_the_page_says_why(tmp_path):
    src = FIXTURES / "exploding_gradients.json"
    code = textwrap.dedent(f"""
        import sys
        sys.modules["matplotlib"] = None
        from nanscope.cli.main import main
        assert main(["report", {str(src)!r}, "-o", {str(tmp_path / "p.html")!r}]) == 0
    """)
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "p.html").read_text()
    assert "install matplotlib" in page and "data:image/svg" not in page
    assert "gradient norm history (oldest first)" in page


def test_every_category_has_a_page_test_and_a_plain_words_explanation():
    from nanscope.core.enums import Category
    from nanscope.report.explain import EXPLANATIONS

    assert set(CATEGORIES) == {str(c) for c in Category}
    assert set(EXPLANATIONS) >= {str(c) for c in Category}
