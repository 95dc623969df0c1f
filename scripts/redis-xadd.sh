#!/usr/bin/env bash
# Baseline for `capsync bench`: durable appends to a Redis stream, the store a user might pick
# instead of capsync. Redis runs with appendonly yes and appendfsync always (every write is on
# disk before its reply), on loopback, in a temporary dir, and is stopped on exit.
#
# Usage: scripts/redis-xadd.sh CLIENTS PIPELINE REQUESTS [PAYLOAD_BYTES]
# Prints one line: clients=C pipeline=P ops_per_s=N p50_ms=X p99_ms=Y
# Installs redis-server and redis-tools from Debian's packages when they are missing.
set -euo pipefail
clients=${1:?clients} pipeline=${2:?pipeline} requests=${3:?requests} bytes=${4:-200}
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  ($sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server redis-tools) >/dev/null 2>&1 \
    || { echo "redis-xadd: cannot install redis-server" >&2; exit 3; }
fi
dir=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
cleanup() {
  if [ -f "$dir/pid" ]; then kill "$(cat "$dir/pid")" 2>/dev/null || true; fi
  sleep 0.2
  rm -rf "$dir"
}
trap cleanup EXIT
redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes --appendfsync always \
  --save '' --daemonize yes --pidfile "$dir/pid" --logfile "$dir/log" >/dev/null
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
field=$(head -c "$bytes" /dev/zero | tr '\0' x)
# --csv: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
line=$(redis-benchmark -p "$port" -c "$clients" -P "$pipeline" -n "$requests" --csv XADD bench '*' f "$field" 2>/dev/null | tail -1)
IFS=',' read -r _ rps _ _ p50 _ p99 _ <<<"$(tr -d '"' <<<"$line")"
echo "clients=$clients pipeline=$pipeline ops_per_s=$rps p50_ms=$p50 p99_ms=$p99"
