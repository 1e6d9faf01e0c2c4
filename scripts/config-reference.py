#!/usr/bin/env python3
"""Prints the README's configuration reference table from the doc comments in
src/config/mod.rs (options are documented where they are declared).

Usage: scripts/config-reference.py > /tmp/table.md   (then paste into README.md)
tests/docs.rs checks that the README names every key."""
import re
import sys

SRC = "src/config/mod.rs"
# Where each struct sits in the file's key tree.
PATHS = [
    ("amqp", "AmqpConfig"), ("http", "HttpConfig"),
    ("exchanges[]", "ExchangeConfig"),
    ("queues[]", "QueueConfig"), ("queues[].bindings[]", "Binding"), ("queues[].watermark", "Watermark"),
    ("stages[]", "StageConfig"), ("stages[].output", "Target"), ("stages[].retry", "RetryConfig"),
    ("publisher", "PublisherConfig"), ("publisher.breaker", "BreakerConfig"),
    ("spool", "SpoolConfig"), ("depth", "DepthConfig"),
    ("dedup", "DedupConfig"), ("redis", "RedisConfig"),
    ("limits", "LimitsConfig"), ("shutdown", "ShutdownConfig"), ("supervisor", "SupervisorConfig"),
    ("orders", "OrdersConfig"), ("security", "SecurityConfig"),
]
NESTED = {"breaker", "bindings", "watermark", "output", "retry"}

src = open(SRC).read()
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
