#!/usr/bin/env bash
# Run the flowgate demo against local RabbitMQ, Redis and PostgreSQL (installed
# and started if needed by scripts/services.sh).
# Usage: scripts/demo.sh [demo args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/services.sh

if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

exec cargo run --release -p flowgate-orders --bin flowgate-orders -- demo "$@"
