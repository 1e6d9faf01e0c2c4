"""The Python order example against the real broker: the gateway answers
503 + Retry-After while the pipeline is saturated, and every accepted order
ends shipped or failed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import List

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flowgate
from flowgate.testing import TestPipeline

from gateway import create_gateway
from services import CONFIG, SECTION, Provider, Services, Settings

ORDER = {"customer_id": "c-1", "items": [{"sku": "sku-red", "qty": 1}], "total": 9.5}


class HeldProvider(Provider):
    """A provider that takes no charge until released: payment stops."""

    def __init__(self, s: Settings) -> None:
        super().__init__(s)
        self.open = asyncio.Event()

    async def charge(self, order_id: str, amount: float) -> str:
        await self.open.wait()
        return await super().charge(order_id, amount)


@pytest.fixture
def small_watermarks(monkeypatch: pytest.MonkeyPatch) -> None:
    # orders.created (queues[0]) and orders.reserved (queues[1]) fill fast.
    for i in (0, 1):
        monkeypatch.setenv(f"FLOWGATE__QUEUES__{i}__WATERMARK__HIGH", "5")
        monkeypatch.setenv(f"FLOWGATE__QUEUES__{i}__WATERMARK__LOW", "2")
    monkeypatch.setenv("FLOWGATE__DEPTH__INTERVAL", "100ms")
    monkeypatch.setenv("FLOWGATE__HTTP__BIND", "")


async def test_the_gateway_answers_503_with_retry_after_until_the_pipeline_drains(
    small_watermarks: None,
) -> None:
    app = flowgate.App(CONFIG, section=SECTION)
    provider = HeldProvider(Settings.of(app.section))
    services = Services(app, provider)
    api = create_gateway(services)
    accepted: List[str] = []
    async with (
        TestPipeline(app) as p,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url="http://gateway"
        ) as http,
    ):
        refused = None
        for _ in range(400):
            r = await http.post("/orders", json=ORDER)
            if r.status_code == 503:
                refused = r
                break
            assert r.status_code == 202, r.text
            accepted.append(r.json()["order_id"])
            await asyncio.sleep(0.01)
        assert refused is not None, "the gateway never pushed back"
        assert refused.headers["retry-after"] == "1"
        assert p.name("orders.created") in refused.json()["error"]
        assert (await http.post("/orders", json=ORDER)).status_code == 503, "it holds"
        # Payment resumes: everything accepted is shipped, nothing lost.
        provider.open.set()
        for _ in range(600):
            states = {services.statuses[o].state for o in accepted}
            if states == {"shipped"}:
                break
            await asyncio.sleep(0.05)
        assert {services.statuses[o].state for o in accepted} == {"shipped"}
        r = await http.get(f"/orders/{accepted[0]}")
        assert r.json()["status"] == "shipped"


async def test_bad_requests_are_refused_before_publishing(small_watermarks: None) -> None:
    app = flowgate.App(CONFIG, section=SECTION)
    api = create_gateway(Services(app))
    async with (
        TestPipeline(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url="http://gateway"
        ) as http,
    ):
        assert (
            await http.post("/orders", content=b"x", headers={"content-type": "text/plain"})
        ).status_code == 415
        assert (
            await http.post("/orders", content=b"{", headers={"content-type": "application/json"})
        ).status_code == 400
        r = await http.post("/orders", json={"customer_id": "", "items": [], "total": -1})
        assert r.status_code == 422
        assert {f["field"] for f in r.json()["fields"]} == {"customer_id", "items", "total"}
        assert (await http.get("/orders/nope")).status_code == 404
