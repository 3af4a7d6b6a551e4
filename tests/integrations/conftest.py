"""Shared setup for the library-integration suite (Lightning, transformers, accelerate, trackers).

Nothing here downloads anything: models are built from configs, trackers run offline or on a
local file store, and the Hugging Face libraries are told they are offline.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PL_DISABLE_FORK", "1")

import pytest  # noqa: E402

sys.path.insert(
    0, str(Path(__file__).parent)
)  # lit_models, hf_models: shared by the tests and the DDP script


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every test writes its bundles, logs and tracker files under its own tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    yield
