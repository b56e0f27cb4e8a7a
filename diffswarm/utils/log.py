"""One logging channel for the whole package.

Every module logs through ``logging.getLogger(__name__)`` (so every logger sits under ``diffswarm``);
nothing takes a ``log=print`` callable. A command-line process calls :func:`console` once: INFO lines then
appear on stdout and warnings on stderr, each as the bare message, as the commands have always printed
them. A library user or a test that configures nothing sees only warnings (Python's last-resort handler);
``logging.getLogger("diffswarm").setLevel(logging.INFO)`` plus a handler of their own shows the rest.
"""

from __future__ import annotations

import logging
import sys

ROOT = "diffswarm"


class _Std(logging.StreamHandler):
    """Writes to ``sys.stdout`` or ``sys.stderr`` as they are at each record (pytest's capsys, redirections)."""

    def __init__(self, which: str, levels: tuple[int, int]):
        super().__init__()
        self.which, self.levels = which, levels
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return getattr(sys, self.which)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; we always look it up
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        return self.levels[0] <= record.levelno < self.levels[1] and super().filter(record)


def console(level: int = logging.INFO) -> None:
    """Show the package's log on the terminal: INFO and DEBUG (at ``level`` and above) on stdout, warnings and
    errors on stderr. Idempotent: a second call changes only the level."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level)
    if not any(isinstance(h, _Std) for h in logger.handlers):
        logger.addHandler(_Std("stdout", (logging.NOTSET, logging.WARNING)))
        logger.addHandler(_Std("stderr", (logging.WARNING, logging.CRITICAL + 1)))


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``."""
    s = int(max(0.0, seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
