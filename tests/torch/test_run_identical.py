"""nanscope must never change what it watches: a healthy script prints the same, exits the
same and ends with the same weights, bit for bit, under `nanscope run` as without it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

HEALTHY = Path(__file__).parent / "healthy"


@pytest.mark.parametrize("script", ["notebook_cnn.py", "class_loop.py"])
def test_healthy_script_is_unchanged_bit_for_bit(script, tmp_path):
    plain_w, watched_w = tmp_path / "plain.pt", tmp_path / "watched.pt"
    plain = subprocess.run(
        [sys.executable, str(HEALTHY / script), str(plain_w)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    watched = subprocess.run(
        [sys.executable, "-m", "nanscope", "run", str(HEALTHY / script), str(watched_w)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == watched.returncode == 0, watched.stderr
    assert plain.stdout == watched.stdout and plain.stdout
    assert watched.stderr == plain.stderr  # not a word from nanscope on a healthy run
    a = torch.load(plain_w, weights_only=True)
    b = torch.load(watched_w, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
