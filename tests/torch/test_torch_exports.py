"""nanscope.torch's __all__ is honest, and importing it pulls in no tensorflow."""

import subprocess
import sys

import nanscope.torch as nt


def test_every_exported_name_resolves_to_a_callable():
    for name in nt.__all__:
        assert callable(getattr(nt, name)), name
    assert {"Guard", "diagnose", "diagnose_eval", "replay", "repair_norm_statistics"} <= set(
        nt.__all__
    )


def test_diagnose_is_the_function_even_after_its_module_is_imported():
    import nanscope.torch.evaluate  # noqa: F401  (imports the diagnose submodule)

    assert callable(nt.diagnose) and nt.diagnose.__name__ == "diagnose"


def test_importing_nanscope_torch_does_not_import_tensorflow():
    code = "import nanscope.torch, sys; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
