"""Publishes keyed events with pika, as a producer that is not flowgate
(tests/partitions.rs).

Usage: publish_keyed_pika.py AMQP_URL EXCHANGE HEADER KEYS FIRST LAST

For seq in FIRST..LAST (exclusive), for each key k0..k<KEYS-1>: one
persistent message to EXCHANGE (routing key "", mandatory, confirmed) with
the key in the string header HEADER, message id "<key>-<seq>" and body
"<key>:<seq>". Prints how many were sent.
"""
import sys

import pika

url, exchange, header = sys.argv[1:4]
keys, first, last = (int(a) for a in sys.argv[4:7])

conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()
sent = 0
for seq in range(first, last):
    for k in range(keys):
        key = f"k{k}"
        ch.basic_publish(
            exchange=exchange,
            routing_key="",
            body=f"{key}:{seq}".encode(),
            properties=pika.BasicProperties(
                message_id=f"{key}-{seq}",
                headers={header: key},
                delivery_mode=2,
            ),
            mandatory=True,
        )
        sent += 1
conn.close()
print(sent)
