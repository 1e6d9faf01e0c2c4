#!/usr/bin/env bash
# Installs the foreign AMQP clients used by tests/foreign_clients.rs into
# $1 (a directory under the build's target dir): pika into $1/py, amqplib
# into $1/node. Idempotent; exits non-zero when a client cannot be installed.
set -euo pipefail
dir="${1:?usage: setup.sh DIR}"
mkdir -p "$dir"
PIKA_VERSION="1.4.4"
AMQPLIB_VERSION="2.3.1"
if ! PYTHONPATH="$dir/py" python3 -c "import pika; assert pika.__version__ == '$PIKA_VERSION'" 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --upgrade --target "$dir/py" "pika==$PIKA_VERSION" >&2
fi
if [ ! -f "$dir/node/node_modules/amqplib/package.json" ] ||
    ! grep -q "\"version\": \"$AMQPLIB_VERSION\"" "$dir/node/node_modules/amqplib/package.json"; then
    npm install --silent --no-audit --no-fund --prefix "$dir/node" "amqplib@$AMQPLIB_VERSION" >&2
fi
PYTHONPATH="$dir/py" python3 -c "import pika" >&2
NODE_PATH="$dir/node/node_modules" node -e "require('amqplib')" >&2
