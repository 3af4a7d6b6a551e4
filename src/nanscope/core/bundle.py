"""Reading repro bundles without a framework (``nanscope show``).

A bundle is a folder holding ``diagnosis.json`` (the contract's JSON plus a ``bundle``
manifest: what it holds, the size and SHA-256 of the state file) and a state file written by
the framework side (``nanscope.torch.bundle``: ``state.pt``). This module only reads JSON and
file bytes, so showing a bundle never imports torch or tensorflow and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanscope.core.diagnosis import Diagnosis
from nanscope.core.errors import BadInputError

BUNDLE_FORMAT = 1
DIAGNOSIS_FILE = "diagnosis.json"


@dataclass
class BundleInfo:
    """A bundle's folder, diagnosis and manifest (no tensors loaded)."""

    folder: Path
    diagnosis: Diagnosis
    manifest: dict[str, Any]

    @property
    def state_path(self) -> Path:
        return self.folder / self.manifest.get("state_file", "state.pt")


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_bundle(path: str | os.PathLike, *, verify: bool = True) -> BundleInfo:
    """Read a bundle (its folder, or a file in it) and check that its state file is whole.

    Raises ``BadInputError`` with a one-line reason for a missing, truncated, corrupt or
    foreign path.

    >>> read_bundle("/nonexistent/bundle")
    Traceback (most recent call last):
    ...
    nanscope.core.errors.BadInputError: '/nonexistent/bundle' does not exist
    """
    p = Path(path)
    if p.is_file() and p.parent.joinpath(DIAGNOSIS_FILE).is_file():
        p = p.parent
    if not p.exists():
        raise BadInputError(f"{str(path)!r} does not exist")
    if not p.is_dir() or not (p / DIAGNOSIS_FILE).is_file():
        raise BadInputError(
            f"{str(path)!r} is not a nanscope repro bundle (no {DIAGNOSIS_FILE} in it)"
        )
    try:
        doc = json.loads((p / DIAGNOSIS_FILE).read_text(encoding="utf-8"))
        manifest = doc["bundle"]
        if not isinstance(manifest, dict):
            raise TypeError("bundle manifest is not an object")
        diagnosis = Diagnosis.from_dict(doc)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(
            f"{str(p)!r} is not a readable repro bundle: {DIAGNOSIS_FILE} is truncated or malformed "
            f"({type(err).__name__})"
        ) from None
    info = BundleInfo(p, diagnosis, manifest)
    state = info.state_path
    if not state.is_file():
        raise BadInputError(f"repro bundle {str(p)!r} is incomplete: {state.name} is missing")
    if verify:
        size = state.stat().st_size
        if size != manifest.get("state_bytes"):
            raise BadInputError(
                f"repro bundle {str(p)!r} is truncated: {state.name} has {size} bytes, "
                f"expected {manifest.get('state_bytes')}"
            )
        if manifest.get("state_sha256") and sha256(state) != manifest["state_sha256"]:
            raise BadInputError(
                f"repro bundle {str(p)!r} is corrupt: {state.name} does not match its SHA-256"
            )
    return info


def describe(info: BundleInfo) -> str:
    """What the bundle holds, as indented lines under the diagnosis text."""
    m = info.manifest
    lines = [f"repro bundle {info.folder}"]
    if m.get("created"):
        lines.append(
            f"  written      {m['created']}" + (f" (torch {m['torch']})" if m.get("torch") else "")
        )
    if m.get("model_tensors") is not None:
        lines.append(
            f"  model        {m['model_tensors']} tensors, {m.get('model_parameters', '?'):,} parameters"
            if isinstance(m.get("model_parameters"), int)
            else f"  model        {m['model_tensors']} tensors"
        )
    if m.get("optimizer"):
        lines.append(
            f"  optimizer    {m['optimizer']}, {m.get('optimizer_state_tensors', 0)} state tensors (before the step)"
        )
    for i, b in enumerate(m.get("batch") or []):
        lines.append(("  batch        " if i == 0 else "               ") + str(b))
    if m.get("left_out"):
        lines.append("  left out     " + ", ".join(map(str, m["left_out"])))
    if m.get("rng"):
        lines.append("  rng states   " + ", ".join(map(str, m["rng"])))
    size = m.get("state_bytes")
    lines.append(
        f"  state file   {info.state_path.name}"
        + (f", {size:,} bytes, SHA-256 verified" if isinstance(size, int) else "")
    )
    lines.append("  reproduce    nanscope.torch.replay(BUNDLE, model, optimizer, train_step)")
    return "\n".join(lines)
