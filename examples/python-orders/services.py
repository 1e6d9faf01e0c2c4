"""The order services as Python handlers on the engine's own config.

The same flow as the Rust example (``examples/orders``), on the same file,
``examples/orders/config/orders.toml`` (its ``[orders]`` section is this
host's): **reserve** takes stock per SKU (an order for more than is left is
dead-lettered ``out-of-stock``), **pay** charges a simulated provider
throttled to ``payment_rate`` charges/s with transient failures (retried a
few times in the handler, then ``flowgate.Retry`` through the stage's
ladder), **ship** assigns a shipment (a plain ``def``: it runs on a thread,
never on the event loop), and **track** records each order's final status
from ``orders.shipped`` and from the dead letters in ``orders.failed``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import flowgate

CONFIG = Path(__file__).resolve().parent.parent / "orders" / "config" / "orders.toml"
SECTION = "orders"


def _seconds(text: str) -> float:
    """``"5ms"``, ``"2s"`` as seconds (the config's duration strings)."""
    for unit, scale in (("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


@dataclass
class Settings:
    """The ``[orders]`` section: the defaults of the Rust example."""

    exchange: str = "shop"
    max_body_bytes: int = 16384
    stock_default: int = 100_000
    stock: Dict[str, int] = field(default_factory=dict)
    payment_rate: float = 100.0
    payment_latency: float = 0.005
    payment_failure_rate: float = 0.02
    payment_attempts: int = 3
    record_capacity: int = 1_000_000

    @classmethod
    def of(cls, section: Dict[str, Any]) -> Settings:
        s = cls()
        for key, value in section.items():
            if key == "payment_latency":
                s.payment_latency = _seconds(value)
            elif hasattr(s, key):
                setattr(s, key, value)
        return s


@dataclass
class Status:
    """An order's last known state."""

    state: str
    created_at_ms: int
    reason: Optional[str] = None
    done_at_ms: Optional[int] = None


class Provider:
    """The payment provider: ``rate`` charges per second at most (a token
    bucket), ``latency`` per call, ``failure_rate`` transient failures.
    """

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.throttle_hits = 0
        self._next = time.monotonic()
        self._lock = asyncio.Lock()

    async def charge(self, order_id: str, amount: float) -> str:
        async with self._lock:
            now = time.monotonic()
            if self._next > now:
                self.throttle_hits += 1
                await asyncio.sleep(self._next - now)
            self._next = max(now, self._next) + 1.0 / self.s.payment_rate
        await asyncio.sleep(self.s.payment_latency)
        if random.random() < self.s.payment_failure_rate:
            raise ConnectionError("provider unavailable")
        return f"ch-{uuid.uuid4().hex[:12]}"


class Services:
    """The records (stock, reservations, charges, statuses) and the four
    handlers, registered on ``app``. Idempotent per order id: a redelivered
    order is not reserved or charged twice.
    """

    def __init__(self, app: flowgate.App, provider: Optional[Provider] = None) -> None:
        self.app = app
        self.s = Settings.of(app.section)
        self.provider = provider or Provider(self.s)
        self.stock: Dict[str, int] = dict(self.s.stock)
        self.reserved: Dict[str, bool] = {}
        self.charges: Dict[str, str] = {}
        self.statuses: OrderedDict[str, Status] = OrderedDict()
        self._register()

    # -- records ----------------------------------------------------------

    def record(self, order_id: str, status: Status) -> None:
        self.statuses[order_id] = status
        self.statuses.move_to_end(order_id)
        while len(self.statuses) > self.s.record_capacity:
            self.statuses.popitem(last=False)

    def forget(self, order_id: str) -> None:
        self.statuses.pop(order_id, None)

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for st in self.statuses.values():
            out[st.state] = out.get(st.state, 0) + 1
        return out

    # -- handlers -----------------------------------------------------------

    def _register(self) -> None:
        app = self.app

        @app.handler("orders.reserve")
        async def reserve(msg: flowgate.Message) -> flowgate.Output:
            order = _order(msg)
            if order["order_id"] not in self.reserved:
                items = order["items"]
                if any(self._left(i["sku"]) < i["qty"] for i in items):
                    raise flowgate.DeadLetter("out-of-stock")
                for i in items:
                    self.stock[i["sku"]] = self._left(i["sku"]) - i["qty"]
                self.reserved[order["order_id"]] = True
            return flowgate.Output(msg.body)

        @app.handler("orders.pay")
        async def pay(msg: flowgate.Message) -> flowgate.Output:
            order = _order(msg)
            oid = order["order_id"]
            if oid not in self.charges:
                for _ in range(self.s.payment_attempts):
                    try:
                        self.charges[oid] = await self.provider.charge(oid, order["total"])
                        break
                    except ConnectionError:
                        continue
                else:
                    raise flowgate.Retry("payment-unavailable")
            order["charge_id"] = self.charges[oid]
            return flowgate.Output(json.dumps(order))

        @app.handler("orders.ship")
        def ship(msg: flowgate.Message) -> flowgate.Output:
            order = _order(msg)
            order["shipment_id"] = f"sh-{order['order_id'][:8]}"
            return flowgate.Output(json.dumps(order))

        @app.handler("orders.track")
        async def track(msg: flowgate.Message) -> None:
            try:
                order = json.loads(msg.body)
                oid, created = order["order_id"], int(order["created_at_ms"])
            except (ValueError, KeyError, TypeError):
                return  # not an order: nothing to track
            now = int(time.time() * 1000)
            reason = msg.header(flowgate.headers.REASON)
            if reason is not None:
                self.record(oid, Status("failed", created, str(reason), now))
            else:
                self.record(oid, Status("shipped", created, None, now))

    def _left(self, sku: str) -> int:
        return self.stock.get(sku, self.s.stock_default)


def _order(msg: flowgate.Message) -> Dict[str, Any]:
    try:
        order: Dict[str, Any] = msg.json()
        order["order_id"], order["items"]
        return order
    except (ValueError, KeyError, TypeError):
        raise flowgate.DeadLetter("malformed-order") from None


def new_order(customer_id: str, items: List[Dict[str, Any]], total: float) -> Dict[str, Any]:
    """An order as the gateway writes it to ``order.created``."""
    return {
        "order_id": uuid.uuid4().hex,
        "customer_id": customer_id,
        "items": items,
        "total": total,
        "created_at_ms": int(time.time() * 1000),
    }
