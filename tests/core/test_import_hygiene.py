"""Importing nanscope (and its core and CLI) must import no framework."""

import subprocess
import sys

import pytest

FRAMEWORKS = ("torch", "tensorflow", "keras", "torchvision", "jax")


@pytest.mark.parametrize(
    "module", ["nanscope", "nanscope.core.rules", "nanscope.cli.main", "nanscope.core.diagnosis"]
)
def test_import_pulls_in_no_framework(module):
    code = (
        f"import {module}, sys, nanscope; nanscope.Diagnosis; nanscope.Category; "
        f"bad = [m for m in {FRAMEWORKS!r} if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_parser_pulls_in_no_framework():
    code = (
        "import sys; from nanscope.cli.main import build_parser; build_parser(); "
        f"bad = [m for m in {FRAMEWORKS!r} if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
