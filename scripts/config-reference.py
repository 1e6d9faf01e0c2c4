#!/usr/bin/env python3
"""Prints a configuration reference table from the doc comments where the
options are declared.

Usage: scripts/config-reference.py [engine|orders] > table.md
  engine (default): the engine's keys, from src/config/*.rs (one file per section), for README.md
  orders: the example's `[orders]` section, from examples/orders/src/config.rs,
          for examples/orders/README.md
tests/docs.rs (and the example's tests/docs.rs) check that the READMEs name
every key."""
import re
import sys

WHICH = sys.argv[1] if len(sys.argv) > 1 else "engine"
# Where each struct sits in the file's key tree.
ENGINE = [
    ("amqp", "AmqpConfig"), ("amqp.tls", "AmqpTlsConfig"), ("http", "HttpConfig"), ("management", "ManagementConfig"),
    ("exchanges[]", "ExchangeConfig"),
    ("queues[]", "QueueConfig"), ("queues[].bindings[]", "Binding"), ("queues[].watermark", "Watermark"),
    ("stages[]", "StageConfig"), ("stages[].output", "Target"), ("stages[].retry", "RetryConfig"), ("stages[].ack_batch", "AckBatchConfig"),
    ("stages[].http", "HttpStageConfig"), ("stages[].batch", "BatchConfig"), ("partitioning", "PartitioningConfig"),
    ("publisher", "PublisherConfig"), ("publisher.breaker", "BreakerConfig"),
    ("spool", "SpoolConfig"), ("depth", "DepthConfig"),
    ("dedup", "DedupConfig"), ("redis", "RedisConfig"), ("postgres", "PostgresConfig"),
    ("limits", "LimitsConfig"), ("shutdown", "ShutdownConfig"), ("supervisor", "SupervisorConfig"),
    ("security", "SecurityConfig"), ("telemetry", "TelemetryConfig"), ("log", "LogConfig"),
]
ORDERS = [("orders", "OrdersConfig")]
try:
    SRC, PATHS = {
        "engine": ("src/config/", ENGINE),
        "orders": ("examples/orders/src/config.rs", ORDERS),
    }[WHICH]
except KeyError:
    sys.exit(f"unknown table {WHICH!r}: engine or orders")
NESTED = {"breaker", "bindings", "watermark", "output", "retry", "http", "tls"}

import glob
import os
src = "\n".join(
    open(f).read()
    for f in (sorted(glob.glob(os.path.join(SRC, "*.rs"))) if SRC.endswith("/") else [SRC])
)
structs = {}
for m in re.finditer(r"pub struct (\w+) \{(.*?)\n\}", src, re.S):
    fields = []
    for f in re.finditer(r"((?:\s*///[^\n]*\n)+)((?:\s*#\[[^\n]*\]\n)*)\s*pub (\w+):", m.group(2)):
        doc = " ".join(l.strip()[3:].strip() for l in f.group(1).strip().split("\n"))
        rename = re.search(r'rename = "(\w+)"', f.group(2))
        fields.append((rename.group(1) if rename else f.group(3), doc))
    structs[m.group(1)] = fields

print("| key | meaning and default |")
print("|---|---|")
for path, name in PATHS:
    if name not in structs:
        sys.exit(f"struct {name} not found in {SRC}")
    for key, doc in structs[name]:
        if key in NESTED:
            continue
        print(f"| `{path}.{key}` | {doc.replace('|', '&#124;')} |")
