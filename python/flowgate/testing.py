"""Testing flowgate handlers and apps, as the Rust test kit does.

Without a broker: build a message with :func:`message`, run a handler on
it with :func:`run_handler` (or :func:`run_handler_async`,
:func:`run_batch`) and read what the engine would do (:class:`Outcome`):

>>> def reserve(msg):
...     if not msg.json().get("sku"):
...         raise flowgate.DeadLetter("no-sku")
...     return flowgate.Output(msg.body, routing_key="order.reserved")
>>> outcome = run_handler(reserve, message(b'{"sku": "A1"}', message_id="o-1"),
...                       output=("shop", "order.next"))
>>> outcome.kind, outcome.outputs[0].routing_key, outcome.outputs[0].message_id
('ack', 'order.reserved', 'o-1')
>>> run_handler(reserve, message(b"{}")).reason
'no-sku'

Against the local broker, :class:`TestPipeline` runs an app on a uniquely
named copy of its topology, deleted afterwards, and accounts for every
message id exactly once::

    async with TestPipeline(app) as pipeline:
        ids = [f"o-{i}" for i in range(50)]
        await pipeline.publish_many(ids, b'{"sku": "A1"}')
        acc = await pipeline.account("shipped", ids)
        acc.assert_exactly_once()
"""

from __future__ import annotations

import asyncio
import inspect
from types import TracebackType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

from . import _flowgate
from ._flowgate import Accounting, BrokerNode, Message, Outcome, PublishedOutput, drive, message
from .app import App
from .logs import current_message

__all__ = [
    "Accounting",
    "BrokerNode",
    "Outcome",
    "PublishedOutput",
    "TestPipeline",
    "drive",
    "message",
    "run_batch",
    "run_handler",
    "run_handler_async",
    "unique",
]

#: A unique name prefix for one test's topology (``t-<prefix>-<random>``).
unique = _flowgate.unique


def _call(handler: Callable[..., Any], arg: Any, first: Optional[Message]) -> Any:
    token = current_message.set(first)
    try:
        return handler(arg)
    finally:
        current_message.reset(token)


def run_handler(
    handler: Callable[[Message], Any],
    msg: Message,
    *,
    output: Optional[Tuple[str, str]] = None,
) -> Outcome:
    """Run ``handler`` on ``msg`` and say what the engine would do.

    ``output`` is the stage's ``(exchange, routing_key)`` (where outputs go
    by default). An ``async def`` handler runs to completion on a new event
    loop; inside a running loop use :func:`run_handler_async`. A handler's
    exception is judged as the engine judges it (``Retry``, ``DeadLetter``,
    other: ``kind == "error"``).

    >>> run_handler(lambda m: None, message(b"x")).kind
    'ack'
    """
    try:
        result = _run(_call(handler, msg, msg))
    except _LoopRunning:
        raise
    except Exception as e:
        return _flowgate.judge(msg, e, True, output)
    return _flowgate.judge(msg, result, False, output)


class _LoopRunning(RuntimeError):
    pass


def _run(result: Any) -> Any:
    """``result``, or what it resolves to on a new event loop."""
    if not inspect.isawaitable(result):
        return result
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_awaited(result))
    if inspect.iscoroutine(result):
        result.close()
    raise _LoopRunning("an event loop is running here: `await run_handler_async(...)` instead")


async def _awaited(aw: Any) -> Any:
    return await aw


async def run_handler_async(
    handler: Callable[[Message], Any],
    msg: Message,
    *,
    output: Optional[Tuple[str, str]] = None,
) -> Outcome:
    """:func:`run_handler` inside a running event loop (``await`` it)."""
    try:
        result = _call(handler, msg, msg)
        if inspect.isawaitable(result):
            result = await result
    except Exception as e:
        return _flowgate.judge(msg, e, True, output)
    return _flowgate.judge(msg, result, False, output)


def run_batch(
    handler: Callable[[List[Message]], Any],
    msgs: Sequence[Message],
    *,
    output: Optional[Tuple[str, str]] = None,
) -> List[Outcome]:
    """Run a batch handler on ``msgs``: one :class:`Outcome` per message.

    A message left without a result is retried by the engine (reported as
    ``"retry"``); raising fails every message alike.

    >>> outs = run_batch(lambda ms: [None, flowgate.DeadLetter("bad")],
    ...                  [message(b"a"), message(b"b")])
    >>> [o.kind for o in outs]
    ['ack', 'dead_letter']
    """
    batch = list(msgs)
    try:
        result = _run(_call(handler, batch, batch[0] if batch else None))
    except _LoopRunning:
        raise
    except Exception as e:
        return _flowgate.judge_batch(batch, e, True, output)
    return _flowgate.judge_batch(batch, result, False, output)


class TestPipeline:
    """Runs ``app`` on a uniquely named copy of its topology on a real broker.

    On entry the app's config is renamed (every exchange and queue becomes
    ``<prefix>.<name>``), the engine starts and every stage consumes; on
    exit it drains and stops and the topology is deleted — also when the
    test failed. Names in its methods are the config's own (``"shipped"``),
    mapped to the unique ones. ``url`` runs it on another broker (a private
    node, a proxy); ``rename=False`` keeps the config's names (made unique
    by the test itself, e.g. to share them with an app in another process).

    >>> async def test_reserve():                          # doctest: +SKIP
    ...     async with TestPipeline(app) as p:
    ...         await p.publish_many(["o-1", "o-2"], b'{"sku": "A1"}')
    ...         (await p.account("reserved", ["o-1", "o-2"])).assert_exactly_once()
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        app: App,
        *,
        url: Optional[str] = None,
        ready_timeout: float = 20.0,
        prefix: str = "py",
        rename: bool = True,
    ) -> None:
        self.app = app
        #: The unique prefix of every name ("" with ``rename=False``).
        self.prefix = unique(prefix) if rename else ""
        config = app.config
        if url is not None:
            config = config.with_url(url)
        #: The configuration the engine runs (unique names, unless the
        #: names are unique already: ``rename=False``, e.g. to share them
        #: with another process).
        self.config = config.uniquely_named(self.prefix) if rename else config
        self._ready_timeout = ready_timeout
        self._cleanup: Optional[_flowgate.Cleanup] = None
        self._kit: Optional[_flowgate.Kit] = None

    def name(self, name: str) -> str:
        """The unique name of the config's exchange or queue ``name``."""
        names = dict(zip(self.app._config.queues, self.config.queues))
        names.update(zip(self.app._config.exchanges, self.config.exchanges))
        return names.get(name, name)

    def dead_letter_queue(self, queue: str) -> str:
        """The unique dead-letter queue of the config's queue ``queue``."""
        dlq = self.config.dead_letter_queue(self.name(queue))
        if dlq is None:
            raise ValueError(f"queue {queue!r} has no dead-letter queue (dead_letter = true)")
        return dlq

    def input(self) -> Tuple[str, str]:
        """``(exchange, routing_key)`` of the first stage's queue's first binding."""
        stages = self.config.stages
        if not stages:
            raise ValueError("the config has no stage: pass exchange and routing_key")
        return self.config.input_of(stages[0][1])

    async def __aenter__(self) -> TestPipeline:
        """Start the app on the unique topology; connect the raw client."""
        self._cleanup = _flowgate.Cleanup(self.config)
        try:
            await self.app.start(config=self.config, ready_timeout=self._ready_timeout)
            fut = self._future()
            runtime = self.app._runtime
            assert runtime is not None
            _flowgate.Kit.connect(runtime, self.config, fut)
            self._kit = await fut
        except BaseException:
            await self.app.stop()
            await asyncio.to_thread(self._cleanup.close)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        """Drain and stop the app, then delete the topology."""
        try:
            await self.app.stop()
        finally:
            self._kit = None
            if self._cleanup is not None:
                # Off the loop: the broker may be behind a proxy on it.
                await asyncio.to_thread(self._cleanup.close)

    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def _client(self) -> _flowgate.Kit:
        if self._kit is None:
            raise RuntimeError("the pipeline is not running (use `async with`)")
        return self._kit

    async def publish(
        self,
        message_id: str,
        body: Union[bytes, str],
        *,
        headers: Optional[Mapping[str, Any]] = None,
        exchange: Optional[str] = None,
        routing_key: Optional[str] = None,
    ) -> None:
        """Publish one message (persistent, confirmed) with a raw client —
        not through the engine — to the input, or to ``exchange`` (a config
        name) with ``routing_key``.
        """
        ex, key = self._route(exchange, routing_key)
        fut = self._future()
        self._client().publish(fut, ex, key, message_id, body, dict(headers) if headers else None)
        await fut

    async def publish_many(
        self,
        ids: Sequence[str],
        body: Union[bytes, str],
        *,
        exchange: Optional[str] = None,
        routing_key: Optional[str] = None,
    ) -> None:
        """Publish one message per id (same body), with confirms."""
        ex, key = self._route(exchange, routing_key)
        fut = self._future()
        self._client().publish_many(fut, ex, key, list(ids), body)
        await fut

    def _route(self, exchange: Optional[str], routing_key: Optional[str]) -> Tuple[str, str]:
        if exchange is None and routing_key is None:
            return self.input()
        return self.name(exchange or ""), routing_key or ""

    async def collect(
        self, queue: str, n: int, timeout: float = 30.0
    ) -> List[Tuple[str, Dict[str, Any]]]:
        """Consume and ack up to ``n`` messages of ``queue`` (a config name,
        or a dead-letter queue's name) within ``timeout`` seconds:
        ``[(message_id, headers), ...]`` in arrival order.
        """
        fut = self._future()
        self._client().collect(fut, self.name(queue), n, timeout)
        result: List[Tuple[str, Dict[str, Any]]] = await fut
        return result

    async def account(
        self, queue: str, expected: Sequence[str], timeout: float = 30.0
    ) -> Accounting:
        """Exactly-once accounting of ``queue`` (one no stage consumes)
        against ``expected``: waits until every id arrived or ``timeout``,
        then until the pipeline is idle, and counts what is left too.
        """
        fut = self._future()
        self._client().account(fut, self.name(queue), list(expected), timeout)
        acc: Accounting = await fut
        return acc

    async def depth(self, queue: str) -> int:
        """Ready messages in ``queue``."""
        fut = self._future()
        self._client().depth(fut, self.name(queue))
        n: int = await fut
        return n
