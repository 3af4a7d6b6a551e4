"""when_imported fires on the real import, even if something probed the module first."""

import subprocess
import sys


def test_find_spec_probe_does_not_consume_the_watch():
    code = (
        "import importlib.util, sys\n"
        "from nanscope.core.importwatch import when_imported\n"
        "seen = []\n"
        "when_imported('json', lambda m: seen.append(m.__name__))\n"
        "sys.modules.pop('json', None)\n"
        "assert importlib.util.find_spec('json') is not None and seen == []\n"
        "import json\n"
        "assert seen == ['json'], seen\n"
    )
    # json may already be imported by the interpreter: drop it first, in a fresh process.
    code = "import sys; sys.modules.pop('json', None)\n" + code
    subprocess.run([sys.executable, "-c", code], check=True)
