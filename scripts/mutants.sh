#!/usr/bin/env bash
# Mutation testing of flowgate's decision code (issue #23; see docs/mutants.md).
#
# Runs cargo-mutants over the modules that decide a message's fate, one group
# of files at a time, each with the actors crate's lib tests filtered to the
# modules that guard the group, so one mutant takes seconds. Each group
# writes mutants.out/<group>/mutants.out/ (outcomes.json, caught.txt,
# missed.txt, unviable.txt, timeout.txt); the table is printed at the end.
#
# Usage:
#   cargo install cargo-mutants --locked     # once (tested with 27.1.0)
#   bash scripts/services.sh                 # Redis on 127.0.0.1:6379 (dedup::redis tests)
#   scripts/mutants.sh [GROUP...] [-- EXTRA cargo-mutants ARGS]
#
# GROUP is one of the names below (default: all). Extra arguments go to every
# cargo mutants call (one job: the default), e.g. `-- --in-place` to mutate this tree instead of a
# scratch copy (much faster: the copy rebuilds every dependency once per
# group; in place, do not edit the tree while it runs), or `-- --list`.
set -euo pipefail
cd "$(dirname "$0")/.."

# group | files (space-separated, under actors/src/) | lib-test arguments
GROUPS_TABLE=(
  "ack|stage/ack.rs|stage::"
  "process|stage/process.rs|stage::"
  "credit|credit.rs|credit stage::"
  "retry|retry.rs|retry stage::"
  "envelope|envelope.rs|envelope stage::process signing retry message"
  "signing|signing.rs|signing stage:: publisher::"
  "breaker|publisher/breaker.rs|publisher::"
  "bucket|publisher/bucket.rs|publisher::bucket"
  "watermark|depth/watermark.rs|depth::"
  "redis|dedup/redis.rs|dedup::redis"
  "memory|dedup/memory.rs|dedup::memory --skip memory_store_has_one_winner"
)

wanted=()
extra=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--" ]]; then
    shift
    extra=("$@")
    break
  fi
  wanted+=("$1")
  shift
done

for row in "${GROUPS_TABLE[@]}"; do
  IFS='|' read -r group files tests <<<"$row"
  if [[ ${#wanted[@]} -gt 0 ]] && [[ ! " ${wanted[*]} " == *" $group "* ]]; then
    continue
  fi
  fargs=()
  for f in $files; do fargs+=(-f "actors/src/$f"); done
  mkdir -p "mutants.out/$group"
  echo "== $group: ${files} (tests: ${tests})" >&2
  # shellcheck disable=SC2086 # the test filters are words
  cargo mutants -p flowgate-actors "${fargs[@]}" --timeout 120 \
    --output "mutants.out/$group" "${extra[@]}" \
    -- --lib -- $tests || true # missed mutants make cargo-mutants exit non-zero
done

# The table: one row per group from its outcomes.json.
python3 - "$@" <<'EOF'
import json, pathlib
rows = []
for o in sorted(pathlib.Path("mutants.out").glob("*/mutants.out/outcomes.json")):
    d = json.loads(o.read_text())
    rows.append((o.parts[1], d.get("total_mutants", 0), d.get("caught", 0), d.get("missed", 0),
                 d.get("unviable", 0), d.get("timeout", 0)))
print(f"{'group':<10} {'mutants':>7} {'caught':>6} {'missed':>6} {'unviable':>8} {'timeout':>7}")
for r in rows:
    print(f"{r[0]:<10} {r[1]:>7} {r[2]:>6} {r[3]:>6} {r[4]:>8} {r[5]:>7}")
EOF
