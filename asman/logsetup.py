"""How Asman's processes log: one line per record on stderr, as text or JSON.

A job controls file names and the text of some errors, and both reach log records: the text
format escapes control characters (``asman.escape``), so a name with a newline cannot forge a
second line. A worker process under ``asman worker --procs`` tags its lines with its number.
"""

from __future__ import annotations

import json
import logging
import sys

from asman.escape import one_line

__all__ = ["JsonFormatter", "LineFormatter", "configure_logging"]


class LineFormatter(logging.Formatter):
    """One line per record, whatever a job put in its message. A traceback, which the
    formatter adds after the message, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def __init__(self, proc: str | None = None) -> None:
        super().__init__()
        self.proc = proc

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.proc is not None:
            line["proc"] = self.proc
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(verbose: int, log_format: str, *, proc: str | None = None) -> None:
    """The root logger at WARNING (``verbose`` 0), INFO (1) or DEBUG (2+), to stderr."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(proc))
    else:
        tag = f"[proc {proc}] " if proc is not None else ""
        handler.setFormatter(LineFormatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if verbose < 2:
        logging.getLogger("nats").setLevel(logging.CRITICAL)
