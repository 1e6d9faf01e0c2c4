#!/usr/bin/env bash
# Installs the foreign AMQP clients used by tests/foreign_clients.rs into
# $1 (a directory under the build's target dir): pika into a virtualenv at
# $1/venv, amqplib into $1/node. Missing interpreters (python3 with venv,
# node, npm) are installed from Debian when running as root with apt-get, as
# in CI. Idempotent; exits non-zero when a client cannot be installed.
set -euo pipefail
dir="${1:?usage: setup.sh DIR}"
mkdir -p "$dir"
PIKA_VERSION="1.4.4"
AMQPLIB_VERSION="2.3.1"

missing=()
python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3 python3-venv)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    else
        echo "setup.sh: missing ${missing[*]} (and not root with apt-get to install them)" >&2
        exit 1
    fi
fi

py="$dir/venv/bin/python"
if ! "$py" -c "import pika; assert pika.__version__ == '$PIKA_VERSION'" 2>/dev/null; then
    python3 -m venv "$dir/venv" >&2
    "$py" -m pip install --quiet --disable-pip-version-check "pika==$PIKA_VERSION" >&2
fi
if [ ! -f "$dir/node/node_modules/amqplib/package.json" ] ||
    ! grep -q "\"version\": \"$AMQPLIB_VERSION\"" "$dir/node/node_modules/amqplib/package.json"; then
    npm install --silent --no-audit --no-fund --prefix "$dir/node" "amqplib@$AMQPLIB_VERSION" >&2
fi
"$py" -c "import pika" >&2
NODE_PATH="$dir/node/node_modules" node -e "require('amqplib')" >&2
