"""State of one ``nanscope run``: the first diagnosis, shared by whichever framework runner
the script turns out to use. Framework-free.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from nanscope.core.diagnosis import Diagnosis
from nanscope.core.errors import NonFiniteError


@dataclass
class RunSession:
    """Handed to ``nanscope.torch.runner.attach`` / ``nanscope.keras.runner.attach``.

    A runner that catches a failure calls ``raise session.fail(diagnosis)``: the first
    diagnosis is kept even if the user's script catches the exception and carries on.
    """

    script: str
    reports_dir: str = "nanscope-reports"
    diagnosis: Diagnosis | None = None
    failed_at: float | None = None  # wall-clock time the first diagnosis was made
    # Optimizer steps done so far, kept current by a runner that counts them: under a launcher
    # (torchrun) a rank's answer to another rank's failure says how far it got.
    steps: int | None = None
    frameworks: list[str] = field(default_factory=list)
    internal_errors: list[str] = field(default_factory=list)
    # Runners register how to take their instrumentation off; ``close`` runs them (newest
    # first) when the script ends, so an in-process ``nanscope run`` leaves no trace.
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def script_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.script))

    def fail(self, diagnosis: Diagnosis) -> NonFiniteError:
        if self.diagnosis is None:
            self.diagnosis = diagnosis
            self.failed_at = time.time()
        return NonFiniteError(self.diagnosis)

    def internal_error(self, where: str, err: BaseException) -> None:
        """nanscope's own bug must never kill the user's run: warn once and go on."""
        from nanscope.core.guarding import internal_error_text

        msg = internal_error_text(where, err)
        if msg not in self.internal_errors:
            self.internal_errors.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        """Remove every runner's instrumentation (called by ``nanscope run`` when the script ends)."""
        while self.cleanups:
            undo = self.cleanups.pop()
            try:
                undo()
            except Exception as err:  # never turn the script's result into our error
                self.internal_error("removing the instrumentation", err)
