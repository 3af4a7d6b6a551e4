"""nanscope.keras exports what it says, and importing it never pulls in torch."""

import subprocess
import sys

import nanscope.keras


def test_all_names_resolve():
    for name in nanscope.keras.__all__:
        assert callable(getattr(nanscope.keras, name)), name
    assert set(nanscope.keras.__all__) == {
        "Guard",
        "diagnose",
        "diagnose_eval",
        "headroom",
        "repair_norm_statistics",
    }


def test_import_pulls_in_no_torch():
    code = (
        "import sys, nanscope, nanscope.keras; from nanscope.keras import Guard, diagnose, diagnose_eval, "
        "repair_norm_statistics; import nanscope.keras.runner, nanscope.keras.trace; "
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
