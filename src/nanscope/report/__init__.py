"""``nanscope.report``: one self-contained HTML page per diagnosis or audit, for looking.

The text output and the JSON stay the contract (../shared/DIAGNOSIS.md); this page is for the
person who opens it the morning after, or attaches it to a bug report.

Design constraints:
    - Framework-free: numpy, matplotlib (optional: without it the numbers stay as tables) and
      the stdlib. A repro bundle's ``state.pt`` is never loaded (that would import torch); the
      samples come from the bundle's framework-free ``samples.npz`` when it has one.
    - Self-contained: CSS, images (PNG / SVG data URIs) and the small script are inline, so the
      page works offline; nothing is fetched.
    - Written atomically (``nanscope.core.io``), never over the input.

Example:
    >>> from nanscope.core.diagnosis import Diagnosis
    >>> page = render(Diagnosis("op_domain", "log received 1 zero", phase="loss", op="aten::log",
    ...                         fixes=["clamp it: `torch.log(x.clamp_min(1e-7))`"]).to_dict())
    >>> page.startswith("<!DOCTYPE html>") and "op_domain" in page and "clamp_min" in page
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanscope.core.diagnosis import AuditReport, Diagnosis
from nanscope.core.errors import BadInputError

__all__ = [
    "render",
    "render_diagnosis",
    "render_audit",
    "load",
    "write_html",
    "write_report",
    "default_output",
    "Loaded",
]


def render_diagnosis(d: Diagnosis, **kw: Any) -> str:
    """The page of one diagnosis (see ``nanscope.report.failure.render`` for the options)."""
    from nanscope.report import failure

    return failure.render(d, **kw)


def render_audit(report: AuditReport, **kw: Any) -> str:
    """The page of an audit (see ``nanscope.report.audit.render`` for the options)."""
    from nanscope.report import audit

    return audit.render(report, **kw)


def render_clean(doc: dict) -> str:
    from nanscope.report.page import document, esc, pill

    fw = doc.get("framework")
    body = (
        f'<header class="top clean"><div class="brand">nanscope</div><h1 id="summary">{pill("clean", "clean")}'
        f'nothing non-finite happened</h1><div class="meta" id="meta">framework <b>{esc(fw or "none")}</b></div>'
        '<div class="explain" id="category"><strong>clean</strong>The run finished without a NaN or Inf in the '
        "loss, the gradients, the parameters or the model's output.</div></header>"
    )
    return document("nanscope: clean", body, data=doc)


def render(doc: dict | Diagnosis | AuditReport, **kw: Any) -> str:
    """The page of a contract JSON document (diagnosis, clean run or audit) or result object."""
    if isinstance(doc, AuditReport):
        return render_audit(doc, **kw)
    if isinstance(doc, Diagnosis):
        return render_diagnosis(doc, **kw)
    if "findings" in doc:
        kw.pop("bundle", None)
        return render_audit(AuditReport.from_dict(doc), doc=doc, **kw)
    if doc.get("diagnosis"):
        kw.pop("data_root", None)
        return render_diagnosis(Diagnosis.from_dict(doc), doc=doc, **kw)
    return render_clean(doc)


@dataclass
class Loaded:
    """What ``nanscope report`` read: the JSON document, the bundle (if any), where it lies."""

    doc: dict
    path: Path  # the file or folder given
    bundle: Any = None  # nanscope.core.bundle.BundleInfo

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent


def load(path: str | os.PathLike) -> Loaded:
    """A repro bundle (folder or its diagnosis.json) or a JSON file written with ``--json``.

    >>> load("/nonexistent.json")
    Traceback (most recent call last):
    ...
    nanscope.core.errors.BadInputError: '/nonexistent.json' does not exist
    """
    from nanscope.core.bundle import DIAGNOSIS_FILE, read_bundle

    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{str(path)!r} does not exist")
    if p.is_dir() or (p.name == DIAGNOSIS_FILE and (p.parent / "state.pt").exists()):
        info = read_bundle(
            p, verify=False
        )  # showing is not replaying: a hash check buys nothing here
        doc = info.diagnosis.to_dict()
        doc["bundle"] = info.manifest
        return Loaded(doc, p, info)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BadInputError(f"{str(p)!r} is not a JSON file (not text)") from None
    except ValueError as err:
        raise BadInputError(f"{str(p)!r} is not valid JSON: {err}") from None
    except OSError as err:
        raise BadInputError(f"cannot read {str(p)!r}: {err.strerror or err}") from None
    if not isinstance(doc, dict) or (
        "diagnosis" not in doc and "findings" not in doc and "category" not in doc
    ):
        raise BadInputError(
            f"{str(p)!r} is not a nanscope diagnosis or audit (no 'diagnosis' or 'findings' in it)"
        )
    if "category" in doc and "diagnosis" not in doc:  # the inner diagnosis object alone
        doc = {
            "schema": 1,
            "status": "nonfinite",
            "framework": doc.get("framework"),
            "diagnosis": doc,
        }
    try:  # fail here, in one line, rather than half-way through rendering
        if doc.get("diagnosis"):
            Diagnosis.from_dict(doc)
        if "findings" in doc:
            AuditReport.from_dict(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BadInputError(
            f"{str(p)!r} is not a readable nanscope document: {type(err).__name__}: {err}"
        ) from None
    return Loaded(doc, p)


def default_output(path: str | os.PathLike) -> Path:
    """``nan.json`` -> ``nan.html``; a bundle folder -> ``BUNDLE/report.html``."""
    p = Path(path)
    if p.is_dir():
        return p / "report.html"
    if p.name == "diagnosis.json":
        return p.parent / "report.html"
    return p.with_suffix(".html")


def write_html(path: str | os.PathLike, page: str) -> Path:
    """Write the page atomically (never a half-written file)."""
    from nanscope.core.io import write_text

    out = write_text(path, page, what="HTML report")
    umask = os.umask(0)
    os.umask(umask)
    try:  # a page is for sharing: the usual file mode, not the temporary file's 0600
        os.chmod(out, 0o666 & ~umask)
    except OSError:
        pass
    return out


def write_report(path: str | os.PathLike, what: dict | Diagnosis | AuditReport, **kw: Any) -> Path:
    """Render ``what`` (see ``render``) and write it to ``path`` atomically; returns the path.

    The ``--html FILE`` option of ``nanscope run / show / data / inspect / demo`` calls this.
    """
    return write_html(path, render(what, **kw))
