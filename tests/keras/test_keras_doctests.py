"""The examples in the docstrings of nanscope.keras run and say what they claim."""

import doctest
import importlib

import pytest

MODULES = ["_util", "amp", "diagnose_step", "evaluate", "guard", "losses", "repair", "trace"]


@pytest.mark.filterwarnings(
    "ignore::RuntimeWarning"
)  # Guard's example warns by design (policy "skip")
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"nanscope.keras.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
