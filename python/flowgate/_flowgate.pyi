"""Type stubs of the compiled module ``flowgate._flowgate`` (the binding).

Users import from ``flowgate`` and ``flowgate.testing``; this module is
their implementation.
"""

import asyncio
import os
from typing import Any, Callable, Dict, Final, List, Mapping, Optional, Sequence, Tuple, Union

__version__: Final[str]
HEADERS: Final[Dict[str, str]]
REASONS: Final[Dict[str, str]]
EXIT: Final[Dict[str, int]]
MAX_ERROR_BYTES: Final[int]
MISSING_BATCH_RESULT: Final[str]

Body = Union[bytes, bytearray, memoryview, str]

class Message:
    """One message taken from a stage's queue."""

    @property
    def body(self) -> bytes:
        """The payload."""
    def text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The payload decoded as text."""
    def json(self) -> Any:
        """The payload parsed as JSON."""
    @property
    def headers(self) -> Dict[str, Any]:
        """The AMQP headers (a new dict on each read)."""
    def header(self, name: str, default: Any = None) -> Any:
        """One header, or ``default``."""
    @property
    def properties(self) -> Dict[str, Any]:
        """The AMQP properties that are set, headers apart."""
    @property
    def message_id(self) -> Optional[str]:
        """The ``message_id`` property."""
    @property
    def content_type(self) -> Optional[str]:
        """The ``content_type`` property."""
    @property
    def correlation_id(self) -> Optional[str]:
        """The ``correlation_id`` property."""
    @property
    def redelivered(self) -> bool:
        """True when the broker delivered it before."""
    @property
    def attempt(self) -> int:
        """The handling attempt: 1, then 2, 3, ... through the retry ladder."""
    @property
    def stage(self) -> str:
        """The stage handling it."""
    @property
    def queue(self) -> str:
        """The queue it was consumed from."""
    @property
    def exchange(self) -> str:
        """The exchange it was published to."""
    @property
    def routing_key(self) -> str:
        """The routing key it was published with."""

class Output:
    """A message to publish once the input is done (acked after its confirm)."""

    def __init__(
        self,
        body: Body,
        *,
        exchange: Optional[str] = None,
        routing_key: Optional[str] = None,
        headers: Optional[Mapping[str, Any]] = None,
        message_id: Optional[str] = None,
        content_type: Optional[str] = None,
    ) -> None: ...
    @property
    def body(self) -> bytes:
        """The payload."""
    @property
    def exchange(self) -> Optional[str]:
        """The exchange, or ``None`` for the stage's ``output``."""
    @property
    def routing_key(self) -> Optional[str]:
        """The routing key, or ``None`` for the stage's ``output``."""
    @property
    def message_id(self) -> Optional[str]:
        """The message id replacing the input's, if any."""
    @property
    def content_type(self) -> Optional[str]:
        """The content type replacing the input's, if any."""
    @property
    def headers(self) -> Dict[str, Any]:
        """The headers added to the input's."""

SqlParam = Union[None, bool, int, float, str, bytes]
SqlValue = Union[None, bool, int, float, str, bytes]

class Transaction:
    """The PostgreSQL transaction a transactional handler runs in.

    flowgate commits it with the inbox row and the handler's outputs when
    the handler returns normally, and rolls it back otherwise. Usable only
    while its handler runs.
    """

    def execute(self, sql: str, *params: SqlParam) -> int:
        """Run one statement (``$1``, ``$2``… for ``params``); the rows it affected."""
    def fetch(self, sql: str, *params: SqlParam) -> List[Tuple[SqlValue, ...]]:
        """Run one query; its rows (cast types other than integers, floats,
        text, bytes and booleans in the SQL)."""

class Config:
    """A validated engine configuration."""

    @staticmethod
    def load(path: Union[str, os.PathLike[str]]) -> Config:
        """A TOML file plus ``FLOWGATE__…`` environment overrides."""
    @staticmethod
    def from_toml(text: str) -> Config:
        """TOML text plus environment overrides."""
    @staticmethod
    def load_with_section(
        path: Union[str, os.PathLike[str]], name: str
    ) -> Tuple[Config, Dict[str, Any]]:
        """A file with a host section ``[name]`` of its own."""
    @staticmethod
    def from_toml_with_section(text: str, name: str) -> Tuple[Config, Dict[str, Any]]:
        """TOML text with a host section ``[name]`` of its own."""
    @staticmethod
    def from_dict(d: Dict[str, Any]) -> Config:
        """A dict shaped like the TOML file, plus environment overrides."""
    def uniquely_named(self, prefix: str) -> Config:
        """Every exchange and queue renamed ``<prefix>.<name>``."""
    def with_url(self, url: str) -> Config:
        """The same configuration on another broker."""
    @property
    def queues(self) -> List[str]:
        """The declared queues' names."""
    @property
    def exchanges(self) -> List[str]:
        """The declared exchanges' names."""
    @property
    def stages(self) -> List[Tuple[str, str, str]]:
        """``(name, queue, handler)`` of every stage."""
    def dead_letter_queue(self, queue: str) -> Optional[str]:
        """The dead-letter queue of ``queue``, if it has one."""
    def input_of(self, queue: str) -> Tuple[str, str]:
        """``(exchange, routing_key)`` of ``queue``'s first binding."""

class Drain:
    """The event loop's reader callback of the bridge."""

    @property
    def fd(self) -> int:
        """The descriptor to watch."""
    def __call__(self) -> None:
        """Run every queued job."""

class Runtime:
    """One engine for one event loop."""

    def __init__(
        self,
        config: Config,
        handlers: Sequence[Tuple[str, Any, bool, bool]],
        order_keys: Sequence[Tuple[str, Callable[[Message], Optional[str]]]] = ...,
        tx_handlers: Sequence[Tuple[str, Callable[[Message, Transaction], Any]]] = ...,
    ) -> None: ...
    def attach(self, event_loop: asyncio.AbstractEventLoop) -> Drain:
        """Bind the bridge to ``event_loop``."""
    def detach(self) -> None:
        """Stop taking work for the loop."""
    def start(self, started: asyncio.Future[Any], escalated: asyncio.Future[Any]) -> None:
        """Start the engine on its own thread."""
    def shutdown(self, future: asyncio.Future[Any]) -> None:
        """Drain and stop; ``future`` gets the report."""
    def join(self) -> None:
        """Wait for the engine's thread to end."""
    def wait_ready(self, future: asyncio.Future[Any], timeout: float) -> None:
        """``future`` gets True once every stage consumes."""
    def publish(
        self,
        future: asyncio.Future[str],
        exchange: str,
        routing_key: str,
        body: Body,
        headers: Optional[Mapping[str, Any]] = None,
        message_id: Optional[str] = None,
        content_type: Optional[str] = None,
    ) -> None:
        """Publish through the engine's ingress."""
    @property
    def http_addr(self) -> Optional[str]:
        """The metrics and health listener."""
    @property
    def management_addr(self) -> Optional[str]:
        """The management API listener."""
    @property
    def ingress_addr(self) -> Optional[str]:
        """The ``POST /publish`` listener."""
    @property
    def spooled(self) -> int:
        """Messages in the durable spool."""
    def metrics(self) -> str:
        """The engine's metrics, Prometheus text format."""
    def queue_depths(self) -> Dict[str, int]:
        """Watched queues' ready messages at the last sample."""
    def queue_peaks(self) -> Dict[str, int]:
        """Watched queues' highest sampled depths."""

class PublishedOutput:
    """One output as the engine would publish it."""

    @property
    def exchange(self) -> str:
        """Its exchange."""
    @property
    def routing_key(self) -> str:
        """Its routing key."""
    @property
    def body(self) -> bytes:
        """Its payload."""
    @property
    def headers(self) -> Dict[str, Any]:
        """Its headers."""
    @property
    def properties(self) -> Dict[str, Any]:
        """Its properties, headers apart."""
    @property
    def message_id(self) -> Optional[str]:
        """Its ``message_id``."""

class Outcome:
    """What the engine would do with a message after its handler ran."""

    @property
    def kind(self) -> str:
        """``ack``, ``retry``, ``dead_letter``, ``invalid_output`` or ``error``."""
    @property
    def reason(self) -> Optional[str]:
        """The retry's, dead letter's or error's reason."""
    @property
    def after(self) -> Optional[float]:
        """A retry's minimum wait in seconds."""
    @property
    def outputs(self) -> List[PublishedOutput]:
        """The outputs an ack publishes."""

class Accounting:
    """How the ids that arrived compare with the ids expected."""

    @property
    def expected(self) -> int:
        """How many distinct ids were expected."""
    @property
    def missing(self) -> List[str]:
        """Expected ids that never arrived."""
    @property
    def duplicates(self) -> Dict[str, int]:
        """Expected ids that arrived more than once."""
    @property
    def unexpected(self) -> Dict[str, int]:
        """Ids that arrived but were not expected."""
    def is_exactly_once(self) -> bool:
        """True when every expected id arrived exactly once and nothing else."""
    def assert_exactly_once(self) -> None:
        """Raise ``AssertionError`` unless exactly once."""

class Cleanup:
    """Deletes a configuration's topology when closed."""

    def __init__(self, config: Config) -> None: ...
    def close(self) -> None:
        """Delete the topology now."""

class Kit:
    """A raw AMQP client on the app's broker."""

    @staticmethod
    def connect(runtime: Runtime, config: Config, future: asyncio.Future[Any]) -> None:
        """Connect; ``future`` gets the kit."""
    def publish(
        self,
        future: asyncio.Future[Any],
        exchange: str,
        routing_key: str,
        message_id: str,
        body: Body,
        headers: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Publish one message, confirmed."""
    def publish_many(
        self,
        future: asyncio.Future[Any],
        exchange: str,
        routing_key: str,
        ids: List[str],
        body: Body,
    ) -> None:
        """Publish one message per id, confirmed."""
    def collect(self, future: asyncio.Future[Any], queue: str, n: int, timeout: float) -> None:
        """Consume and ack up to ``n`` messages."""
    def account(
        self, future: asyncio.Future[Any], queue: str, expected: List[str], timeout: float
    ) -> None:
        """Exactly-once accounting of ``queue``."""
    def depth(self, future: asyncio.Future[Any], queue: str) -> None:
        """Ready messages in ``queue``."""

def log(
    level: int,
    logger: str,
    message: str,
    stage: Optional[str] = None,
    message_id: Optional[str] = None,
) -> None:
    """Write one record into the engine's log."""

def flush_telemetry() -> None:
    """Export the spans still buffered."""

def unique(prefix: str) -> str:
    """A unique topology prefix."""

def message(
    body: Body,
    *,
    message_id: Optional[str] = None,
    headers: Optional[Mapping[str, Any]] = None,
    content_type: Optional[str] = None,
    correlation_id: Optional[str] = None,
    exchange: str = "",
    routing_key: str = "",
    queue: str = "",
    stage: str = "",
    redelivered: bool = False,
    attempt: int = 1,
) -> Message:
    """A message as a stage would hand it to its handler, without a broker."""

def judge(
    message: Message, value: Any, raised: bool, output: Optional[Tuple[str, str]] = None
) -> Outcome:
    """The engine's judgement of a handler's result."""

def judge_batch(
    messages: List[Message], value: Any, raised: bool, output: Optional[Tuple[str, str]] = None
) -> List[Outcome]:
    """The engine's judgement of a batch handler's result."""

def drive(
    url: str,
    exchange: str,
    routing_key: str,
    sink: str,
    n: int,
    body_bytes: int = 256,
    timeout: float = 300.0,
    rate: Optional[float] = None,
) -> Dict[str, Any]:
    """The benches' publish/collect driver."""

class BrokerNode:
    """A private RabbitMQ node for tests that disturb a broker."""

    @staticmethod
    def start() -> BrokerNode:
        """Start a node and wait until it accepts connections."""
    @property
    def amqp_url(self) -> str:
        """Its AMQP URL."""
    def set_memory_alarm(self, on: bool) -> None:
        """Raise or clear the memory alarm."""
    def list_queue(self, queue: str) -> Tuple[int, int, int]:
        """``(ready, unacked, consumers)`` of ``queue``."""
    def stop(self) -> None:
        """Stop the node and remove its directory."""
