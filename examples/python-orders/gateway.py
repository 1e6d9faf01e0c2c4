"""The order gateway: FastAPI publishing through ``app.publish``.

``POST /orders`` answers 415 (not JSON), 413 (over ``max_body_bytes``),
400 (not JSON), 422 (a field is invalid), **503 with ``Retry-After``** while
the pipeline is saturated (``flowgate.Backpressure``: ``orders.created``
above its watermark, a broker alarm, the publisher's bounds — exactly as
the engine's own ingress answers), or 202 ``{"order_id", "status":
"queued"}`` once ``order.created`` is confirmed by the broker.
``GET /orders/{id}`` and ``GET /orders/stats`` read the status view.

The app runs inside the gateway's lifespan (``async with app``)::

    uvicorn --factory gateway:create     # orders.toml, or $FLOWGATE_CONFIG
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncContextManager, AsyncIterator, Callable, Dict, Optional

import flowgate
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services import CONFIG, SECTION, Services, Status, new_order


def create_gateway(
    services: Services,
    run: Optional[Callable[[], AsyncContextManager[Any]]] = None,
) -> FastAPI:
    """The gateway over ``services``; ``run`` runs the app during the
    lifespan (default ``async with app``; the demo runs a renamed copy).
    """
    app = services.app

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with run() if run is not None else app:
            yield

    api = FastAPI(lifespan=lifespan)

    @api.post("/orders")
    async def create(request: Request) -> JSONResponse:
        ct = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ct != "application/json" and not ct.endswith("+json"):
            return JSONResponse({"error": "send application/json"}, status_code=415)
        body = await request.body()
        if len(body) > services.s.max_body_bytes:
            return JSONResponse({"error": "too large"}, status_code=413)
        try:
            doc = json.loads(body)
        except ValueError:
            return JSONResponse({"error": "not JSON"}, status_code=400)
        fields = _invalid(doc)
        if fields:
            return JSONResponse({"error": "invalid order", "fields": fields}, status_code=422)
        order = new_order(doc["customer_id"], doc["items"], float(doc["total"]))
        # Recorded first: the pipeline may finish the order before the
        # publish returns here.
        services.record(order["order_id"], Status("queued", order["created_at_ms"]))
        try:
            await app.publish(
                app.name(services.s.exchange),
                "order.created",
                json.dumps(order),
                message_id=order["order_id"],
                content_type="application/json",
            )
        except flowgate.Backpressure as e:
            services.forget(order["order_id"])
            return JSONResponse(
                {"error": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after)}
            )
        except flowgate.PublishError as e:
            services.forget(order["order_id"])
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return JSONResponse({"order_id": order["order_id"], "status": "queued"}, status_code=202)

    @api.get("/orders/stats")
    async def stats() -> Dict[str, int]:
        return services.counts()

    @api.get("/orders/{order_id}")
    async def status(order_id: str) -> JSONResponse:
        st = services.statuses.get(order_id)
        if st is None:
            return JSONResponse({"error": "no such order"}, status_code=404)
        return JSONResponse({"order_id": order_id, "status": st.state, "reason": st.reason})

    return api


def _invalid(doc: Any) -> list:  # type: ignore[type-arg]
    out = []
    if not isinstance(doc, dict):
        return [{"field": "", "message": "an order is an object"}]
    if not isinstance(doc.get("customer_id"), str) or not doc["customer_id"]:
        out.append({"field": "customer_id", "message": "required text"})
    items = doc.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= 100:
        out.append({"field": "items", "message": "1 to 100 items"})
    else:
        for i, it in enumerate(items):
            ok = (
                isinstance(it, dict)
                and isinstance(it.get("sku"), str)
                and isinstance(it.get("qty"), int)
                and 1 <= it["qty"] <= 10_000
            )
            if not ok:
                out.append({"field": f"items[{i}]", "message": "sku text, qty 1..10000"})
    if not isinstance(doc.get("total"), (int, float)) or doc["total"] < 0:
        out.append({"field": "total", "message": "a non-negative number"})
    return out


def create() -> FastAPI:
    """The gateway on ``orders.toml`` (``$FLOWGATE_CONFIG`` wins), for
    ``uvicorn --factory gateway:create``.
    """
    import os

    return create_gateway(
        Services(flowgate.App(os.environ.get("FLOWGATE_CONFIG", CONFIG), section=SECTION))
    )
