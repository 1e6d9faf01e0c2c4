#!/usr/bin/env python3
"""An order-pricing service for flowgate's `http` handler, standard library only.

flowgate consumes the queue and POSTs each message here; this service prices
the order and answers with one output, which flowgate publishes (confirmed)
before it acks the input. See README.md for the request and answer format.

Run:   python3 worker.py [--host 127.0.0.1] [--port 8000]
       (port 0 picks a free one; the first line on stdout is always
       "listening on http://HOST:PORT")

Fault switches, for demos and tests (environment at start, or at any time
with POST /admin and a JSON object holding any of these keys):

  unavailable      WORKER_UNAVAILABLE=1       answer 503 to every message
  unavailable_for  WORKER_UNAVAILABLE_FOR=s   ...for that many seconds from now
  retry_after      WORKER_RETRY_AFTER=s       the Retry-After of those 503s (default 1)
  reject_ids       WORKER_REJECT_IDS=a,b      answer 422 to these message ids
  slow_ids         WORKER_SLOW_IDS=a,b        sleep slow_seconds before answering these
  slow_seconds     WORKER_SLOW_SECONDS=s      (default 30: past any sane timeout)
  bad_output_ids   WORKER_BAD_OUTPUT_IDS=a,b  answer these with an output whose
                                              routing key is 300 bytes (invalid)
  malformed_ids    WORKER_MALFORMED_IDS=a,b   answer these 200 with a JSON document
                                              that is not an outputs document
  hold_in_flight   WORKER_HOLD_IN_FLIGHT=n    hold each message request until n requests
                                              have been in flight at once (from then on,
                                              hold none), or hold_seconds passed
  hold_seconds     WORKER_HOLD_SECONDS=s      (default 1)

GET /admin/stats answers {"handled": n, "max_in_flight": n (most requests
being handled at once), "statuses": {"200": n, ...}, "calls": {message id: n},
"batches": [size of each batch request, ...]}.

A request with the header x-flowgate-batch-size (a stage with `batch`) holds
{"entries": [{"entry_id", "headers", "body"}, ...]}; the answer is
{"statuses": [{"entry_id", "status": "ack" | "dead_letter", ...}, ...]}.
"""

import argparse
import json
import os
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _ids(value):
    return {v for v in (value or "").split(",") if v}


class State:
    """The fault switches and counters, shared by the request threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.unavailable = os.environ.get("WORKER_UNAVAILABLE") == "1"
        self.unavailable_until = time.monotonic() + float(
            os.environ.get("WORKER_UNAVAILABLE_FOR", "0")
        )
        self.retry_after = float(os.environ.get("WORKER_RETRY_AFTER", "1"))
        self.reject_ids = _ids(os.environ.get("WORKER_REJECT_IDS"))
        self.slow_ids = _ids(os.environ.get("WORKER_SLOW_IDS"))
        self.slow_seconds = float(os.environ.get("WORKER_SLOW_SECONDS", "30"))
        self.bad_output_ids = _ids(os.environ.get("WORKER_BAD_OUTPUT_IDS"))
        self.malformed_ids = _ids(os.environ.get("WORKER_MALFORMED_IDS"))
        self.hold_in_flight = int(os.environ.get("WORKER_HOLD_IN_FLIGHT", "0"))
        self.hold_seconds = float(os.environ.get("WORKER_HOLD_SECONDS", "1"))
        # Wakes held requests when the in-flight count grows.
        self.grew = threading.Condition(self.lock)
        self.handled = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.statuses = {}
        self.calls = {}
        self.batches = []

    def configure(self, cfg):
        with self.lock:
            if "unavailable" in cfg:
                self.unavailable = bool(cfg["unavailable"])
            if "unavailable_for" in cfg:
                self.unavailable_until = time.monotonic() + float(cfg["unavailable_for"])
            if "retry_after" in cfg:
                self.retry_after = float(cfg["retry_after"])
            for key in ("reject_ids", "slow_ids", "bad_output_ids", "malformed_ids"):
                if key in cfg:
                    setattr(self, key, set(cfg[key]))
            if "slow_seconds" in cfg:
                self.slow_seconds = float(cfg["slow_seconds"])
            if "hold_in_flight" in cfg:
                self.hold_in_flight = int(cfg["hold_in_flight"])
            if "hold_seconds" in cfg:
                self.hold_seconds = float(cfg["hold_seconds"])

    def call(self, message_id):
        with self.lock:
            self.calls[message_id] = self.calls.get(message_id, 0) + 1

    def count(self, status):
        with self.lock:
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            if status == 200:
                self.handled += 1

    def enter(self):
        """Counts a request in, then holds it (see hold_in_flight): a
        caller's bound on requests in flight is then reached, and a caller
        that exceeds it is seen doing so, instead of each answer leaving
        before the next request comes."""
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.grew.notify_all()
            deadline = time.monotonic() + self.hold_seconds
            while self.max_in_flight < self.hold_in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.grew.wait(left)

    def leave(self):
        with self.lock:
            self.in_flight -= 1

    def stats(self):
        with self.lock:
            return {
                "handled": self.handled,
                "max_in_flight": self.max_in_flight,
                "statuses": dict(self.statuses),
                "calls": dict(self.calls),
                "batches": list(self.batches),
            }


STATE = State()


def price(order):
    """The business logic: total an order."""
    items = order.get("items", [])
    total = sum(float(i["price"]) * int(i["qty"]) for i in items)
    return {
        "order_id": order["order_id"],
        "total": round(total, 2),
        "items": len(items),
        "status": "priced",
    }


class Handler(BaseHTTPRequestHandler):
    # Keep-alive, so flowgate's connection pool reuses connections.
    protocol_version = "HTTP/1.1"
    # One write per answer (flushed after each request) and no Nagle delay:
    # headers and body in separate segments would wait for delayed ACKs.
    wbufsize = -1
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # quiet: one line per message is noise
        pass

    def _answer(self, status, body=b"", content_type="text/plain", extra=()):
        try:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # flowgate gave up (timeout) and closed the connection.
            self.close_connection = True

    def _json(self, status, doc):
        self._answer(status, json.dumps(doc).encode(), "application/json")

    def do_GET(self):
        if self.path == "/admin/stats":
            self._json(200, STATE.stats())
        elif self.path == "/healthz":
            self._answer(200, b"ok")
        else:
            self._answer(404, b"no such page")

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        if self.path == "/admin":
            try:
                STATE.configure(json.loads(body or b"{}"))
            except (ValueError, TypeError) as e:
                return self._answer(400, f"bad admin request: {e}".encode())
            return self._json(200, {"ok": True})
        STATE.enter()
        try:
            self.handle_message(body)
        finally:
            STATE.leave()

    def handle_message(self, body):
        if self.headers.get("x-flowgate-batch-size") is not None:
            return self.handle_batch(body)
        # flowgate percent-encodes mapped values: unquote gives the id back.
        message_id = urllib.parse.unquote(self.headers.get("x-amqp-message-id", ""))
        s = STATE
        with s.lock:
            unavailable = s.unavailable or time.monotonic() < s.unavailable_until
            retry_after = s.retry_after
        if unavailable:
            # Slow down: flowgate waits Retry-After, holding the message.
            s.call(message_id)
            s.count(503)
            return self._answer(503, b"busy", extra=[("retry-after", f"{retry_after:g}")])
        kind, what = process(message_id, body)
        if kind == "reject":
            # A permanent problem with this message: flowgate dead-letters
            # it with reason "http 422: ..." (the text below).
            s.count(422)
            return self._answer(422, what.encode())
        s.count(200)
        if kind == "malformed":
            return self._json(200, {"outputs": "not a list"})
        self._json(200, {"outputs": [what]})

    def handle_batch(self, body):
        """A batch stage's request: {"entries": [...]}, answered with one
        status per entry (see README.md)."""
        s = STATE
        entries = json.loads(body)["entries"]
        with s.lock:
            unavailable = s.unavailable or time.monotonic() < s.unavailable_until
            retry_after = s.retry_after
            s.batches.append(len(entries))
        if unavailable:
            for e in entries:
                s.call(urllib.parse.unquote(e["headers"].get("x-amqp-message-id", "")))
            s.count(503)
            return self._answer(503, b"busy", extra=[("retry-after", f"{retry_after:g}")])
        statuses = []
        for e in entries:
            message_id = urllib.parse.unquote(e["headers"].get("x-amqp-message-id", ""))
            kind, what = process(message_id, e.get("body", "").encode())
            if kind == "reject":
                statuses.append({"entry_id": e["entry_id"], "status": "dead_letter", "reason": what})
            else:
                statuses.append({"entry_id": e["entry_id"], "status": "ack", "outputs": [what]})
        s.count(200)
        self._json(200, {"statuses": statuses})


def process(message_id, body):
    """One message: ("ok", output), ("reject", reason) or ("malformed", None)."""
    s = STATE
    s.call(message_id)
    with s.lock:
        rejected = message_id in s.reject_ids
        slow = s.slow_seconds if message_id in s.slow_ids else 0
        bad_output = message_id in s.bad_output_ids
        malformed = message_id in s.malformed_ids
    if slow:
        time.sleep(slow)
    try:
        priced = price(json.loads(body))
    except (ValueError, KeyError, TypeError) as e:
        return "reject", f"not a valid order: {e!r}"
    if rejected:
        return "reject", "order rejected: unknown customer"
    if malformed:
        return "malformed", None
    output = {
        # exchange and routing_key default to the stage's `output`.
        "body": priced,
        "message_id": message_id,
        "headers": {"x-priced-by": "python-worker"},
    }
    if bad_output:
        output["routing_key"] = "k" * 300
    return "ok", output


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=int(os.environ.get("WORKER_PORT", "8000")))
    args = ap.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
