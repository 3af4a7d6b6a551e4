"""Run a callback right after a module is first imported, without importing it ourselves.

``nanscope run`` uses this to attach the PyTorch or the TensorFlow instrumentation only when
the user's script imports that framework: nanscope never pulls in a framework the program
did not (importing torchvision after tensorflow in one process crashes).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable


class _Watcher(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[object], None]]] = {}
        self._busy: set[str] = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.callbacks or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            for finder in sys.meta_path:
                if spec is not None:
                    break
                if finder is self:
                    continue
                spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        original = spec.loader
        outer = self

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return original.create_module(spec)

            def exec_module(self, module):
                original.exec_module(module)
                # Popped here, not in find_spec: `importlib.util.find_spec(name)` (TensorFlow
                # probes for keras that way) asks for a spec without importing anything.
                for cb in outer.callbacks.pop(fullname, []):
                    cb(module)
                if not outer.callbacks and outer in sys.meta_path:
                    sys.meta_path.remove(outer)

        spec.loader = _Loader()
        return spec


_watcher = _Watcher()


def when_imported(name: str, callback: Callable[[object], None]) -> None:
    """Call ``callback(module)`` once ``name`` is imported (now, if it already is)."""
    if name in sys.modules:
        callback(sys.modules[name])
        return
    _watcher.callbacks.setdefault(name, []).append(callback)
    if _watcher not in sys.meta_path:
        sys.meta_path.insert(0, _watcher)


def stop_watching() -> None:
    _watcher.callbacks.clear()
    if _watcher in sys.meta_path:
        sys.meta_path.remove(_watcher)
