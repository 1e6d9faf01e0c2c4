#!/usr/bin/env bash
# The project's test command: services, formatting, lints, tests.
# Usage: scripts/test.sh   (from anywhere; runs in the repo root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n==================== %s ====================\n' "$*"; }

section "services (RabbitMQ + Redis)"
bash scripts/services.sh

# Rust toolchain from rustup, if installed for this user.
if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "error: cargo not found (install a Rust toolchain via rustup)" >&2; exit 1; }
cargo --version

section "cargo fmt --check"
cargo fmt --all -- --check

section "no import cycle among modules"
python3 scripts/module-cycles.py src actors/src examples/orders/src testkit/src

section "deploy: Helm chart rendered and validated against Kubernetes schemas (offline)"
bash scripts/check-deploy.sh
bash scripts/check-deploy.sh --self-test

section "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

section "cargo test (lib, bins, tests, examples; engine, runtime, example, test kit)"
# Not --all-targets: that would also run the criterion benches.
cargo test --workspace --lib --bins --tests --examples

section "cargo test (doc tests)"
cargo test --workspace --doc

section "python: flowgate for Python (pip install ./python in a fresh virtualenv; ruff, mypy, pytest, the python-orders demo)"
bash scripts/python.sh

section "all checks passed"
