"""Reports and JSON files nanscope writes get the mode a plain ``open(path, "w")`` would give
them (they are written to a temporary file first, which is owner-only), so a teammate can read
the report in a shared folder; an existing file keeps its own mode."""

import os
import stat

from nanscope.core.io import write_json


def test_a_new_file_gets_the_umask_mode_and_an_existing_file_keeps_its_own(tmp_path):
    mask = os.umask(0o022)
    try:
        new = write_json(tmp_path / "out.json", {"status": "clean"})
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        private = tmp_path / "private.json"
        private.write_text("{}")
        private.chmod(0o600)
        write_json(private, {"status": "clean"})
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(mask)
