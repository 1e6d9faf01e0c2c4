"""Publishes the foreign-client message set with pika (tests/foreign_clients.rs).

Usage: publish_pika.py AMQP_URL EXCHANGE ROUTING_KEY CONTROL_QUEUE

Each message goes twice, with publisher confirms: to EXCHANGE/ROUTING_KEY
(through the flowgate stage under test) and to CONTROL_QUEUE through the
default exchange (straight from the broker), so the test can compare what the
stage forwarded with what the broker delivers untouched.
"""
import datetime
import decimal
import sys

import pika

url, exchange, routing_key, control = sys.argv[1:5]

# Every field type pika can encode: S x t I l D T F A V (it has no float or
# narrow integer encoders).
every_type = {
    "longstr": "text ✓",
    "empty-str": "",
    "bytes": bytes(range(256)),
    "true": True,
    "false": False,
    "int": -123456,
    "long": 2**40 + 7,
    "decimal": decimal.Decimal("-12.345"),
    "timestamp": datetime.datetime(2024, 2, 29, 12, 34, 56),
    "void": None,
    "array": [1, "two", b"\x00\xff", None, True, decimal.Decimal("3.5"), [], {}],
    "empty-table": {},
}
headers = dict(every_type)
headers["nested"] = dict(every_type, deeper={"again": dict(every_type)})
headers["ключ ✓"] = "unicode key"

messages = [
    (
        b"pika-0 \xe2\x9c\x93",
        pika.BasicProperties(
            content_type="application/x-test; charset=utf-8",
            content_encoding="identity",
            headers=headers,
            delivery_mode=1,
            priority=7,
            correlation_id="pika-corr",
            reply_to="pika.reply",
            expiration="600000",
            message_id="pika-all-properties",
            timestamp=1_700_000_000,
            type="pika.type",
            user_id="guest",
            app_id="pika-app",
            cluster_id="pika-cluster",
        ),
    ),
    # No properties at all: no delivery mode, no id (matched by body).
    (b"pika-1 no properties", pika.BasicProperties()),
    (
        b"pika-2 " + bytes(range(256)),
        pika.BasicProperties(delivery_mode=2, message_id="pika-persistent-binary"),
    ),
    (b"", pika.BasicProperties(delivery_mode=1, message_id="pika-empty-body")),
]

conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()
for body, props in messages:
    # Unroutable or nacked raises: the test fails.
    ch.basic_publish(exchange, routing_key, body, props, mandatory=True)
    ch.basic_publish("", control, body, props, mandatory=True)
conn.close()
print(len(messages))
