#!/usr/bin/env bash
# Install (if missing) and start (if not answering) the services flowgate's
# tests and demo need: RabbitMQ on 127.0.0.1:5672, Redis on 127.0.0.1:6379 and
# PostgreSQL on 127.0.0.1:5432 (Debian's `postgresql`; the tests log in as
# postgres/postgres over TCP and create a private database each); and install the tools the tests run (promtool, headless Chromium).
# Idempotent and safe to run when they are already up: it never stops or
# reconfigures a running service, except that it enables the RabbitMQ plugins
# the engine needs and cannot enable itself (RABBIT_PLUGINS; enabling one does
# not restart the node). Needs root for apt-get (as on CI).
#
# Usage: scripts/services.sh            (or: source it and call ensure_services)
set -euo pipefail

RABBIT_WAIT_SECS="${RABBIT_WAIT_SECS:-90}"
REDIS_WAIT_SECS="${REDIS_WAIT_SECS:-30}"
PG_WAIT_SECS="${PG_WAIT_SECS:-60}"

log() { printf '[services] %s\n' "$*" >&2; }

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# (a) Debian packages: apt-get update only once, and only if something is missing.
ensure_packages() {
    local missing=()
    pkg_installed rabbitmq-server || missing+=(rabbitmq-server)
    pkg_installed redis-server || missing+=(redis-server)
    # redis-tools provides redis-cli (a dependency of redis-server, but be explicit)
    command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
    # Debian's default PostgreSQL (15 on bookworm): server, client, pg_ctlcluster
    command -v pg_lsclusters >/dev/null 2>&1 || missing+=(postgresql)
    command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
    # a C compiler for crates with C parts (ring)
    command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    # promtool (Debian's prometheus package) checks the shipped alert rules
    # and a live /metrics scrape (tests/observability.rs); the server it also
    # installs is not started (policy-rc.d below).
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    # Debian's Chromium and its WebDriver drive the console's browser test
    # (tests/console_browser.rs, headless); no browser is downloaded. A font
    # so that its screenshots show text.
    [[ -x /usr/bin/chromium ]] || missing+=(chromium)
    [[ -x /usr/bin/chromedriver ]] || missing+=(chromium-driver)
    pkg_installed fonts-dejavu-core || missing+=(fonts-dejavu-core)
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Keep postinst from starting services itself (no init system in containers);
    # we start them below. Only if no policy-rc.d is in place already.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
    fi
    local rc=0
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    ((added_policy)) && rm -f "$policy"
    return "$rc"
}

# Make the RabbitMQ node name not depend on the machine's hostname resolving,
# and listen on loopback only. Only written when no config exists yet.
ensure_rabbitmq_config() {
    mkdir -p /etc/rabbitmq
    if [[ ! -e /etc/rabbitmq/rabbitmq-env.conf ]]; then
        printf 'NODENAME=rabbit@localhost\nERL_EPMD_ADDRESS=127.0.0.1\n' >/etc/rabbitmq/rabbitmq-env.conf
    fi
    if [[ ! -e /etc/rabbitmq/rabbitmq.conf ]]; then
        printf 'listeners.tcp.local = 127.0.0.1:5672\n' >/etc/rabbitmq/rabbitmq.conf
    fi
}

# Plugins the engine needs but cannot enable itself: partitioned queues
# (queues[].partitions) declare an x-consistent-hash exchange.
RABBIT_PLUGINS=(rabbitmq_consistent_hash_exchange)

# (b') Each of RABBIT_PLUGINS enabled on the running node (online, no restart).
ensure_rabbitmq_plugins() {
    local p
    for p in "${RABBIT_PLUGINS[@]}"; do
        if rabbitmq-plugins -q is_enabled "$p" >/dev/null 2>&1; then
            log "rabbitmq: plugin $p already enabled"
        else
            log "rabbitmq: enabling plugin $p"
            rabbitmq-plugins -q enable "$p" >/dev/null
        fi
    done
}

rabbit_ready() { port_open 5672 && rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; }

# (b) RabbitMQ answering on 5672; start it detached if not, wait up to RABBIT_WAIT_SECS.
ensure_rabbitmq() {
    if port_open 5672; then
        log "rabbitmq: already answering on 5672"
        return 0
    fi
    ensure_rabbitmq_config
    if rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
        log "rabbitmq: node is up but not listening yet (booting or app stopped)"
    else
        log "rabbitmq: starting (rabbitmq-server -detached)"
        rabbitmq-server -detached
    fi
    local deadline=$((SECONDS + RABBIT_WAIT_SECS))
    until rabbit_ready; do
        if ((SECONDS >= deadline)); then
            log "rabbitmq: not ready after ${RABBIT_WAIT_SECS}s; recent log:"
            tail -n 40 /var/log/rabbitmq/*.log 2>/dev/null >&2 || true
            return 1
        fi
        sleep 1
    done
    log "rabbitmq: ready on 5672"
}

redis_ready() { [[ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" == "PONG" ]]; }

# (c) Redis answering PING; start a non-persistent daemon if not.
ensure_redis() {
    if redis_ready; then
        log "redis: already answering PING"
        return 0
    fi
    log "redis: starting"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 \
        --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    local deadline=$((SECONDS + REDIS_WAIT_SECS))
    until redis_ready; do
        if ((SECONDS >= deadline)); then
            log "redis: not answering after ${REDIS_WAIT_SECS}s; log:"
            tail -n 20 /var/log/redis/ci.log >&2 || true
            return 1
        fi
        sleep 0.5
    done
    log "redis: ready on 6379"
}

# The password login the tests use (postgres/postgres over TCP; with `trust`
# in pg_hba.conf any password is accepted, which is fine too).
pg_login() { PGPASSWORD=postgres PGCONNECT_TIMEOUT=3 psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; }

# (d) PostgreSQL answering on 5432 with the postgres/postgres login. Debian's
# package creates the cluster (`<version> main`, listen_addresses=localhost,
# port 5432); it is started with pg_ctlcluster if it is down, created first if
# it does not exist. The password is set only if the login fails (a fresh
# install: peer auth on the socket, scram over TCP); nothing else is changed.
ensure_postgres() {
    if ! port_open 5432; then
        local version
        version="$(pg_lsclusters -h 2>/dev/null | awk '$2 == "main" { print $1; exit }')"
        if [[ -z $version ]]; then
            version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
            log "postgres: creating cluster $version main"
            pg_createcluster "$version" main --port 5432 >/dev/null
        fi
        log "postgres: starting cluster $version main"
        pg_ctlcluster "$version" main start
        local deadline=$((SECONDS + PG_WAIT_SECS))
        until port_open 5432; do
            if ((SECONDS >= deadline)); then
                log "postgres: not listening after ${PG_WAIT_SECS}s; log:"
                tail -n 20 "/var/log/postgresql/postgresql-$version-main.log" >&2 || true
                return 1
            fi
            sleep 0.5
        done
    else
        log "postgres: already answering on 5432"
    fi
    if ! pg_login; then
        log "postgres: setting the postgres role's password for the tests' TCP login"
        su postgres -c "psql -q -c \"ALTER ROLE postgres PASSWORD 'postgres'\"" >/dev/null
    fi
    pg_login || { log "postgres: cannot log in as postgres/postgres on 127.0.0.1:5432"; return 1; }
    log "postgres: ready on 5432"
}

ensure_services() {
    ensure_packages
    ensure_rabbitmq
    ensure_rabbitmq_plugins
    ensure_redis
    ensure_postgres
}

# Run when executed, not when sourced.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    ensure_services
fi
