"""The exceptions of flowgate: what a handler raises, and what the app raises.

A handler raises :class:`Retry` (a transient failure: through the stage's
retry ladder) or :class:`DeadLetter` (a permanent one: to the dead-letter
queue with the reason header); any other exception goes through the ladder
too, with its type and message as the last error. ``app.publish`` raises
:class:`Backpressure` while the pipeline is saturated, and
:class:`PublishError` for a message that will never be taken.

>>> import flowgate
>>> try:
...     raise flowgate.Retry("stock service busy", after=30)
... except flowgate.Retry as e:
...     (e.reason, e.after)
('stock service busy', 30.0)
"""

from __future__ import annotations

import datetime
from typing import Optional, Union

__all__ = [
    "Backpressure",
    "ConfigError",
    "DeadLetter",
    "FlowgateError",
    "PublishError",
    "Retry",
]


class FlowgateError(Exception):
    """The base of every exception flowgate raises or reads.

    >>> issubclass(flowgate.Backpressure, flowgate.FlowgateError)
    True
    """


class ConfigError(FlowgateError, ValueError):
    """A configuration the engine refuses, naming the key at fault.

    Raised by :class:`flowgate.App` for a file, TOML text or dict the daemon
    would refuse too (``flowgate check-config`` says the same), and when
    the app starts for a stage whose ``handler`` nobody registered.

    >>> try:
    ...     flowgate.App.from_toml("[stages]\\nname = 's'\\n")
    ... except flowgate.ConfigError as e:
    ...     print(e.key)
    stages
    """

    def __init__(self, message: str, key: str = "<config>", reason: str = "") -> None:
        super().__init__(message)
        #: The key at fault, as a path (``stages[0].prefetch``).
        self.key = key
        #: Why it is refused.
        self.reason = reason or message


def _seconds(after: Union[float, int, datetime.timedelta, None]) -> Optional[float]:
    if after is None:
        return None
    seconds = after.total_seconds() if isinstance(after, datetime.timedelta) else float(after)
    if not seconds >= 0:
        raise ValueError(f"`after` must be zero or more seconds, not {after!r}")
    return seconds


class Retry(FlowgateError):
    """Raised by a handler: try this message again later.

    The message goes through the stage's retry ladder (``retry = {
    max_attempts, backoff }``): a copy waits in a tier queue and comes back
    as the next attempt (:attr:`flowgate.Message.attempt`); after the last
    attempt it is dead-lettered as ``max-attempts``. Without a ladder it is
    dead-lettered at once with ``reason``.

    ``after`` (seconds, or a :class:`datetime.timedelta`) asks for at least
    that long a wait: the first tier of the ladder whose delay is at least
    ``after`` is used (the longest tier when none is).

    >>> @app.handler("reserve")                       # doctest: +SKIP
    ... async def reserve(msg: flowgate.Message) -> None:
    ...     raise flowgate.Retry("inventory locked", after=datetime.timedelta(seconds=5))
    >>> flowgate.Retry("busy").after is None
    True
    """

    def __init__(
        self,
        reason: str,
        after: Union[float, int, datetime.timedelta, None] = None,
    ) -> None:
        super().__init__(reason)
        #: Why; the last error (``x-flowgate-last-error``) of the retried copy.
        self.reason = str(reason)
        #: The shortest acceptable wait before the next attempt, in seconds.
        self.after: Optional[float] = _seconds(after)


class DeadLetter(FlowgateError):
    """Raised by a handler: this message can never be handled.

    It is published to the stage's dead-letter queue with ``reason`` as its
    reason header (``flowgate.headers.REASON``), then the input is acked.

    >>> e = flowgate.DeadLetter("out-of-stock")
    >>> e.reason
    'out-of-stock'
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        #: The dead letter's reason header.
        self.reason = str(reason)


class PublishError(FlowgateError):
    """``app.publish`` could not take the message, and retrying the same
    message will not help (no queue bound to the route, too large, an id
    or header the broker cannot carry).

    ``status`` is the HTTP status the engine's own ingress answers with for
    the same failure (404, 413, 400, ...).

    >>> flowgate.PublishError("no queue is bound to shop/nowhere", status=404).status
    404
    """

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        #: The HTTP status the engine's ingress answers with.
        self.status = status


class Backpressure(PublishError):
    """``app.publish`` refused: the pipeline is saturated (a queue above its
    watermark, a broker alarm, the publisher's bounds, no confirm in time)
    or the engine is shutting down. Nothing was stored; try again after
    :attr:`retry_after` seconds.

    A web gateway answers ``503`` with ``Retry-After: retry_after``, as the
    engine's own ``POST /publish`` does:

    >>> try:                                           # doctest: +SKIP
    ...     await app.publish("shop", "order.created", body)
    ... except flowgate.Backpressure as e:
    ...     return Response(status_code=503, headers={"Retry-After": str(e.retry_after)})
    >>> flowgate.Backpressure("queue orders above its watermark", retry_after=1).status
    503
    """

    def __init__(self, message: str, retry_after: int = 1, queue: Optional[str] = None) -> None:
        super().__init__(message, status=503)
        #: Seconds to wait before trying again (the ``Retry-After`` value).
        self.retry_after = retry_after
        #: The queue above its watermark, when that is the reason.
        self.queue = queue
