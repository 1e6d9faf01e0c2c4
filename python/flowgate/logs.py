"""Logging: handler records carry the message, and can go to the engine's log.

While a handler runs, every :class:`logging.LogRecord` made by any logger
carries ``record.stage`` and ``record.message_id`` (``None`` outside
handlers), so a format such as ``"%(stage)s %(message_id)s %(message)s"``
works everywhere.

:class:`LogHandler` writes records into the engine's own log — text or
JSON lines on stderr as ``[log] format`` says, next to the engine's lines
and with the same ``stage`` and ``message_id`` fields. ``App.run()``
installs it on the root logger when no handler is configured.

>>> import logging
>>> logging.getLogger("shop").addHandler(flowgate.LogHandler())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import _flowgate

if TYPE_CHECKING:
    from ._flowgate import Message

__all__ = ["LogHandler", "current_message", "install_record_factory"]

#: The message the running handler is handling (``None`` outside handlers).
#: The engine sets it around each handler call, for the handler's task or
#: thread only.
current_message: ContextVar[Optional[Message]] = ContextVar("flowgate_message", default=None)

_installed: Optional[Callable[..., logging.LogRecord]] = None


def install_record_factory() -> None:
    """Make every log record carry ``stage`` and ``message_id`` (idempotent).

    Wraps the current record factory (``logging.setLogRecordFactory``), so
    other factories keep working. ``flowgate.App`` calls it when it starts.

    >>> install_record_factory()
    >>> logging.makeLogRecord({}).stage is None   # doctest: +SKIP
    True
    """
    global _installed
    previous = logging.getLogRecordFactory()
    if previous is _installed:
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        msg = current_message.get()
        record.stage = msg.stage if msg is not None else None
        record.message_id = msg.message_id if msg is not None else None
        return record

    _installed = factory
    logging.setLogRecordFactory(factory)


class LogHandler(logging.Handler):
    """Writes records into the engine's log (``[log] format``: text or JSON).

    The record's logger name, level and formatted message go to the
    engine's log under the target ``python``, with the handler's ``stage``
    and ``message_id`` as fields.

    >>> logging.getLogger().addHandler(LogHandler())   # doctest: +SKIP
    """

    def emit(self, record: logging.LogRecord) -> None:
        """Write one record (never raises; errors go to ``handleError``)."""
        try:
            _flowgate.log(
                record.levelno,
                record.name,
                self.format(record),
                getattr(record, "stage", None),
                getattr(record, "message_id", None),
            )
        except Exception:
            self.handleError(record)
