"""``flowgate.App``: the engine in-process, with handlers written in Python."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Type, TypeVar, Union

from . import _flowgate, logs
from .errors import ConfigError, FlowgateError

__all__ = ["App", "BatchHandler", "Handler", "ShutdownReport"]

log = logging.getLogger("flowgate")

#: A handler: ``async def`` or plain ``def``, taking a Message and returning
#: None, an Output or a list of Outputs (or raising Retry / DeadLetter).
Handler = Callable[[_flowgate.Message], Any]
#: A batch handler: takes a list of Messages, returns one result per message.
BatchHandler = Callable[[List[_flowgate.Message]], Any]
F = TypeVar("F", bound=Callable[..., Any])
K = TypeVar("K", bound=Callable[..., Optional[str]])
T = TypeVar("T", bound=Callable[..., Any])

#: What ``App.stop()`` returns: ``{"clean": bool, "stages": [{"stage",
#: "drained", "abandoned"}, ...]}`` (``clean``: every stage drained and
#: every publish confirmed within ``[shutdown] grace``).
ShutdownReport = Dict[str, Any]


@dataclass(frozen=True)
class _Registered:
    func: Callable[..., Any]
    is_async: bool
    batch: bool


def _is_async(func: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
        getattr(func, "__call__", None)  # noqa: B004 - an object with `async def __call__`
    )


class App:
    """A flowgate engine in this process, whose handlers are Python functions.

    ``config`` is the daemon's TOML file (``FLOWGATE__…`` environment
    overrides apply, as for ``flowgate run``); without it,
    ``$FLOWGATE_CONFIG`` names the file. :meth:`from_toml` and
    :meth:`from_dict` take the same settings as text or a dict. A
    configuration the daemon would refuse raises
    :class:`flowgate.ConfigError`.

    Register a handler per ``handler = "name"`` of the config's stages with
    :meth:`handler` (or :meth:`batch_handler`), then run it:

    * :meth:`run` blocks, as ``flowgate run`` does: SIGTERM or Ctrl-C drain
      the engine in the documented order, and the exit status is the
      daemon's;
    * ``async with app:`` (or ``await app.serve()``) runs it inside an
      existing asyncio program, e.g. a FastAPI lifespan.

    >>> app = flowgate.App.from_toml('''
    ... [[exchanges]]
    ... name = "shop"
    ... [[queues]]
    ... name = "orders"
    ... bindings = [{ exchange = "shop", routing_key = "order.created" }]
    ... [[stages]]
    ... name = "reserve"
    ... queue = "orders"
    ... handler = "reserve"
    ... output = { exchange = "shop", routing_key = "order.reserved" }
    ... ''')
    >>> @app.handler("reserve")
    ... async def reserve(msg: flowgate.Message) -> flowgate.Output:
    ...     return flowgate.Output(msg.body)
    >>> app.run()                                          # doctest: +SKIP
    """

    def __init__(
        self, config: Union[str, os.PathLike[str], None] = None, *, section: Optional[str] = None
    ) -> None:
        if config is None:
            path = os.environ.get("FLOWGATE_CONFIG")
            if not path:
                raise ConfigError(
                    "no configuration: pass App(path) or set FLOWGATE_CONFIG", "<config>"
                )
            config = path
        if section is None:
            self._init(_flowgate.Config.load(os.fspath(config)), {})
        else:
            self._init(*_flowgate.Config.load_with_section(os.fspath(config), section))

    def _init(self, config: _flowgate.Config, section: Dict[str, Any]) -> None:
        self._config = config
        self._section = section
        self._running_config: Optional[_flowgate.Config] = None
        self._started = False
        self._handlers: Dict[str, _Registered] = {}
        self._order_keys: Dict[str, Callable[[Any], Optional[str]]] = {}
        self._tx_handlers: Dict[str, Callable[..., Any]] = {}
        self._runtime: Optional[_flowgate.Runtime] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._drain: Optional[_flowgate.Drain] = None
        self._stopping: Optional[asyncio.Event] = None
        self._escalation: Optional[str] = None

    @classmethod
    def from_toml(cls, text: str, *, section: Optional[str] = None) -> App:
        """An app from TOML text (the daemon's file format).

        >>> flowgate.App.from_toml('[http]\\nbind = ""\\n').config.stages
        []
        """
        app = cls.__new__(cls)
        if section is None:
            app._init(_flowgate.Config.from_toml(text), {})
        else:
            app._init(*_flowgate.Config.from_toml_with_section(text, section))
        return app

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> App:
        """An app from a dict shaped like the TOML file (``None`` values are
        left out, as if unset).

        >>> app = flowgate.App.from_dict({"queues": [{"name": "audit"}]})
        >>> app.config.queues
        ['audit']
        """
        app = cls.__new__(cls)
        app._init(_flowgate.Config.from_dict(dict(config)), {})
        return app

    @property
    def config(self) -> _flowgate.Config:
        """The validated configuration it runs (while running with a
        ``start(config=...)`` override, e.g. a test pipeline's uniquely
        named copy, that one).
        """
        return self._running_config or self._config

    def name(self, name: str) -> str:
        """The name the running engine uses for the config's exchange or
        queue ``name``: the same, unless it runs a renamed copy (a test
        pipeline's, a demo's).

        >>> flowgate.App.from_dict({"queues": [{"name": "audit"}]}).name("audit")
        'audit'
        """
        running = self.config
        names = dict(zip(self._config.queues, running.queues))
        names.update(zip(self._config.exchanges, running.exchanges))
        return names.get(name, name)

    @property
    def section(self) -> Dict[str, Any]:
        """The host's own section of the file (``section="orders"``: the
        ``[orders]`` table, with its ``FLOWGATE__ORDERS__…`` overrides), as
        ``Config::load_with_section`` reads it for a Rust host. The engine
        refuses every other key it does not know.

        >>> app = flowgate.App.from_toml('[shop]\\ngreeting = "hi"\\n', section="shop")
        >>> app.section
        {'greeting': 'hi'}
        """
        return self._section

    # -- handlers ----------------------------------------------------------

    def handler(self, name: str) -> Callable[[F], F]:
        """Register the decorated function for stages with ``handler = name``.

        The function takes a :class:`flowgate.Message` and returns ``None``
        (ack), an :class:`flowgate.Output` or a list of them (published and
        confirmed before the ack), or raises :class:`flowgate.Retry` /
        :class:`flowgate.DeadLetter`; any other exception goes through the
        stage's retry ladder. ``async def`` handlers run on the app's event
        loop; plain ``def`` handlers on a thread pool, never on the loop.
        At most the stage's ``concurrency`` run at once. The function is
        returned unchanged (test it with :func:`flowgate.testing.run_handler`).

        >>> app = flowgate.App.from_toml('[http]\\nbind = ""\\n')
        >>> @app.handler("audit")
        ... def audit(msg: flowgate.Message) -> None:
        ...     print(msg.message_id)
        """
        return self._register(name, batch=False)

    def batch_handler(self, name: str) -> Callable[[F], F]:
        """Register a handler of a stage with ``batch = { size, timeout }``.

        It takes a list of messages and returns a list with one result per
        message, in order: ``None``, an ``Output`` or a list of them, or an
        exception instance (``Retry``, ``DeadLetter`` or another) for that
        message alone. Raising fails the whole batch alike.

        >>> app = flowgate.App.from_toml('[http]\\nbind = ""\\n')
        >>> @app.batch_handler("store")
        ... async def store(msgs: list[flowgate.Message]) -> list[None]:
        ...     return [None for _ in msgs]
        """
        return self._register(name, batch=True)

    def tx_handler(self, name: str) -> Callable[[T], T]:
        """Register a transactional handler for stages with ``handler = name``.

        It is a plain ``def`` taking a :class:`flowgate.Message` and a
        :class:`flowgate.Transaction`, and answers like :meth:`handler`.
        Its SQL (``tx.execute``, ``tx.fetch``) runs in the PostgreSQL
        transaction flowgate's inbox opened for the message (the config
        needs ``[postgres] url``): the inbox row ``(stage, message_id)``
        and the outputs (as outbox rows, published by the relay) commit
        with it when the handler returns normally; an exception, ``Retry``
        or ``DeadLetter`` rolls it all back. A redelivery of a committed
        message is acked without calling the handler. It runs on a thread
        pool, never on the event loop.

        >>> app = flowgate.App.from_toml('[http]\\nbind = ""\\n')
        >>> @app.tx_handler("reserve")
        ... def reserve(msg: flowgate.Message, tx: flowgate.Transaction) -> None:
        ...     tx.execute("UPDATE stock SET units = units - 1 WHERE sku = $1", msg.body.decode())
        """

        def register(func: T) -> T:
            if not callable(func) or _is_async(func):
                raise TypeError("a transactional handler is a plain function (def, not async def)")
            if name in self._tx_handlers or name in self._handlers:
                raise ValueError(f"a handler named {name!r} is registered already")
            self._tx_handlers[name] = func
            return func

        return register

    def order_key(self, name: str) -> Callable[[K], K]:
        """Register the decorated function as the key of stages with ``order_by = name``.

        It takes a :class:`flowgate.Message` and returns its key (a ``str``)
        or ``None`` for no key (the stage's ``missing_key`` decides). The
        stage handles one key's messages one at a time, in delivery order,
        different keys in parallel. It runs on the engine's intake, once
        per delivery, holding the GIL: keep it short and never block in it.
        An exception, or a result that is neither ``str`` nor ``None``, is
        no key (logged). The function is returned unchanged.

        >>> app = flowgate.App.from_toml('[http]\\nbind = ""\\n')
        >>> @app.order_key("tenant")
        ... def tenant(msg: flowgate.Message) -> "str | None":
        ...     return msg.headers.get("tenant")
        """

        def register(func: K) -> K:
            if not callable(func) or _is_async(func):
                raise TypeError("an order key is a plain function (def, not async def)")
            if name in self._order_keys:
                raise ValueError(f"an order key named {name!r} is registered already")
            self._order_keys[name] = func
            return func

        return register

    def _register(self, name: str, *, batch: bool) -> Callable[[F], F]:
        def register(func: F) -> F:
            if not callable(func):
                raise TypeError(f"a handler is a function, not {type(func).__name__}")
            if name in self._handlers or name in self._tx_handlers:
                raise ValueError(f"a handler named {name!r} is registered already")
            self._handlers[name] = _Registered(func, _is_async(func), batch)
            return func

        return register

    # -- running inside an event loop ----------------------------------------

    async def start(
        self, *, config: Optional[_flowgate.Config] = None, ready_timeout: Optional[float] = None
    ) -> None:
        """Connect, declare the topology and start consuming, on this loop.

        Returns once the engine runs (with ``ready_timeout`` seconds, once
        every stage consumes too: ``TimeoutError`` otherwise). ``config``
        replaces the app's for this run (the test pipeline's unique copy).
        Prefer ``async with app:``.
        """
        if self._runtime is not None:
            raise RuntimeError("the app is running already")
        logs.install_record_factory()
        loop = asyncio.get_running_loop()
        handlers = [(n, r.func, r.is_async, r.batch) for n, r in self._handlers.items()]
        order_keys = list(self._order_keys.items())
        tx_handlers = list(self._tx_handlers.items())
        runtime = _flowgate.Runtime(config or self._config, handlers, order_keys, tx_handlers)
        drain = runtime.attach(loop)
        loop.add_reader(drain.fd, drain)
        self._runtime, self._loop, self._drain = runtime, loop, drain
        self._running_config = config
        self._stopping = asyncio.Event()
        self._escalation = None
        started = loop.create_future()
        escalated = loop.create_future()
        escalated.add_done_callback(self._escalated)
        try:
            runtime.start(started, escalated)
            await started
            self._started = True
            if ready_timeout is not None:
                ready = loop.create_future()
                runtime.wait_ready(ready, ready_timeout)
                if not await ready:
                    raise TimeoutError(f"the stages are not all consuming within {ready_timeout}s")
        except BaseException:
            await self.stop()
            raise

    def _escalated(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        self._escalation = str(fut.result())
        log.error("shutting down: %s", self._escalation)
        if self._stopping is not None:
            self._stopping.set()

    async def stop(self) -> ShutdownReport:
        """Drain and stop (the engine's shutdown order); returns its report.

        The ingress and host servers stop accepting, every stage stops
        intake and lets in-flight messages finish (their outputs confirmed,
        inputs acked) within ``[shutdown] grace``, outstanding confirms are
        awaited, then the connections close. Handlers keep running on this
        loop meanwhile.
        """
        runtime, loop, drain = self._runtime, self._loop, self._drain
        if runtime is None or loop is None or drain is None:
            return {"clean": True, "stages": []}
        try:
            done = loop.create_future()
            runtime.shutdown(done)
            report: Optional[ShutdownReport] = await done
            runtime.join()
        finally:
            runtime.detach()
            loop.remove_reader(drain.fd)
            self._runtime = self._loop = self._drain = None
            self._running_config = None
            self._started = False
            if self._stopping is not None:
                self._stopping.set()
        return report or {"clean": True, "stages": []}

    async def __aenter__(self) -> App:
        """``async with app:`` — start on entry, drain and stop on exit."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        """Drain and stop."""
        await self.stop()

    def request_stop(self) -> None:
        """Ask :meth:`serve` (and :meth:`run`) to drain and return.

        Safe to call from any thread or a signal handler.
        """
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            loop.call_soon_threadsafe(stopping.set)

    async def serve(self) -> None:
        """Run until :meth:`request_stop` (or an escalation), then drain.

        Raises :class:`flowgate.FlowgateError` after an actor spent its
        restart budget (the engine could not heal itself).
        """
        async with self:
            assert self._stopping is not None
            await self._stopping.wait()
        if self._escalation is not None:
            raise FlowgateError(f"the engine escalated: {self._escalation}")

    # -- the blocking entry point --------------------------------------------

    def run(self) -> None:
        """Run until SIGTERM or SIGINT (Ctrl-C), then drain; as ``flowgate run``.

        Returns after a clean shutdown (exit status 0). Exits the process
        with status 2 for a configuration the engine refuses and 1 when
        the engine cannot start or escalated, printing why. A second signal
        while draining is ignored; there is no traceback on Ctrl-C. Python
        log records go to the engine's log unless logging is configured.
        """
        root = logging.getLogger()
        if not root.handlers:
            root.addHandler(logs.LogHandler())
            root.setLevel(logging.INFO)
        try:
            code = asyncio.run(self._main())
        finally:
            _flowgate.flush_telemetry()
        if code != _flowgate.EXIT["OK"]:
            raise SystemExit(code)

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        received: List[str] = []

        def on_signal(sig: signal.Signals) -> None:
            if received:
                log.warning("%s received while draining; still draining", sig.name)
                return
            received.append(sig.name)
            log.info("%s received", sig.name)
            self.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            try:
                await self.start()
            except ConfigError as e:
                print(f"flowgate: invalid configuration: {e}", file=sys.stderr)
                return int(_flowgate.EXIT["USAGE"])
            except FlowgateError as e:
                print(f"flowgate: {e}", file=sys.stderr)
                return int(_flowgate.EXIT["FAILURE"])
            log.info("flowgate running; SIGTERM or Ctrl-C to stop")
            if received:
                self.request_stop()
            assert self._stopping is not None
            await self._stopping.wait()
            report = await self.stop()
            if not report.get("clean", True):
                log.warning("shutdown grace expired with work in flight: %s", report)
            if self._escalation is not None:
                return int(_flowgate.EXIT["FAILURE"])
            return int(_flowgate.EXIT["OK"])
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    # -- publishing and addresses ---------------------------------------------

    def _running(self) -> _flowgate.Runtime:
        runtime, loop = self._runtime, self._loop
        if runtime is None or loop is None:
            raise RuntimeError("the app is not running (use `async with app:` or app.run())")
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is not loop:
            raise RuntimeError("call this on the event loop the app runs on")
        return runtime

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: Union[bytes, str],
        *,
        headers: Optional[Mapping[str, Any]] = None,
        message_id: Optional[str] = None,
        content_type: Optional[str] = None,
    ) -> Awaitable[str]:
        """Publish a message through the engine; awaitable.

        The message is persistent and ``mandatory``, admitted as the
        engine's own ingress admits it (refused while a queue it routes to
        is above its watermark, or no declared queue is bound to the route)
        and published through the engine's publisher (token bucket, confirm
        window, breaker and spool, signing) within ``[ingress]
        publish_timeout``. Resolves to ``"confirmed"`` or ``"spooled"``.

        Raises :class:`flowgate.Backpressure` (with ``retry_after``) while
        the pipeline is saturated — answer ``503`` with ``Retry-After`` —
        and :class:`flowgate.PublishError` for a message that will never be
        taken.

        >>> await app.publish("shop", "order.created", b'{"sku": "A1"}',
        ...                   message_id="o-1")              # doctest: +SKIP
        'confirmed'
        """
        runtime = self._running()
        assert self._loop is not None
        fut: asyncio.Future[str] = self._loop.create_future()
        runtime.publish(
            fut,
            exchange,
            routing_key,
            body,
            dict(headers) if headers else None,
            message_id,
            content_type,
        )
        return fut

    def metrics(self) -> str:
        """The engine's metrics in the Prometheus text format, as
        ``GET /metrics`` on ``[http] bind`` serves them (every metric and
        its labels: the project README's table).

        >>> 'flowgate_messages_acked_total{stage="reserve"}' in app.metrics()  # doctest: +SKIP
        True
        """
        if self._runtime is None:
            raise RuntimeError("the app is not running")
        return self._runtime.metrics()

    def queue_depths(self) -> Dict[str, int]:
        """Ready messages of every queue the depth monitor watches (stage
        inputs, queues with a watermark), at its last sample.
        """
        if self._runtime is None:
            raise RuntimeError("the app is not running")
        return self._runtime.queue_depths()

    def queue_peaks(self) -> Dict[str, int]:
        """The highest sampled depth of every watched queue since the start."""
        if self._runtime is None:
            raise RuntimeError("the app is not running")
        return self._runtime.queue_peaks()

    @property
    def http_addr(self) -> Optional[str]:
        """``host:port`` of ``[http] bind`` (``/metrics``, ``/healthz``,
        ``/readyz``) while running, if configured.
        """
        return self._runtime.http_addr if self._runtime is not None else None

    @property
    def management_addr(self) -> Optional[str]:
        """``host:port`` of the management API while running, if configured."""
        return self._runtime.management_addr if self._runtime is not None else None

    @property
    def ingress_addr(self) -> Optional[str]:
        """``host:port`` of ``POST /publish`` while running, if configured."""
        return self._runtime.ingress_addr if self._runtime is not None else None

    @property
    def running(self) -> bool:
        """True from when :meth:`start` has started the engine until :meth:`stop`."""
        return self._started
