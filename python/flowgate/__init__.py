"""flowgate for Python: resilient RabbitMQ pipelines, handlers in Python.

The engine is flowgate's own (Rust, in this process): it consumes with
credit = prefetch, runs a stage's handler — here a Python function —
publishes its outputs with confirms and acks the input only after every
output is confirmed; retries through broker-side TTL tiers, dead letters
with reason headers, dedup, a circuit breaker with a durable spool,
watermark backpressure, metrics, health, a management API, telemetry and
a graceful drain, all as configured in the daemon's TOML file.

>>> app = flowgate.App.from_toml('''
... [[exchanges]]
... name = "shop"
... [[queues]]
... name = "orders"
... bindings = [{ exchange = "shop", routing_key = "order.created" }]
... [[queues]]
... name = "reserved"
... bindings = [{ exchange = "shop", routing_key = "order.reserved" }]
... [[stages]]
... name = "reserve"
... queue = "orders"
... handler = "reserve"
... output = { exchange = "shop", routing_key = "order.reserved" }
... ''')
>>> @app.handler("reserve")
... async def reserve(msg: flowgate.Message) -> flowgate.Output:
...     order = msg.json()
...     if order.get("qty", 0) <= 0:
...         raise flowgate.DeadLetter("empty-order")
...     return flowgate.Output(msg.body)
>>> app.run()                                         # doctest: +SKIP

See :class:`App`, :class:`Message`, :class:`Output`, the exceptions
(:class:`Retry`, :class:`DeadLetter`, :class:`Backpressure`, ...), and
:mod:`flowgate.testing` for tests with and without a broker.
"""

from . import headers, reasons
from ._flowgate import Message, Output, Transaction, __version__
from .app import App, BatchHandler, Handler, ShutdownReport
from .errors import (
    Backpressure,
    ConfigError,
    DeadLetter,
    FlowgateError,
    PublishError,
    Retry,
)
from .logs import LogHandler

__all__ = [
    "App",
    "Backpressure",
    "BatchHandler",
    "ConfigError",
    "DeadLetter",
    "FlowgateError",
    "Handler",
    "LogHandler",
    "Message",
    "Output",
    "PublishError",
    "Retry",
    "ShutdownReport",
    "Transaction",
    "__version__",
    "headers",
    "reasons",
]
