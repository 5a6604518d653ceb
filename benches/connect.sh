#!/usr/bin/env bash
# Change data capture and sinks, each next to a baseline in the same run: starts a PostgreSQL
# (wal_level = logical, its own data dir, a free port), a Redis and a broker on loopback, then
# runs syncline-connect-bench (connect/src/bin/syncline-connect-bench.rs), ROUNDS times.
# Not part of CI (.ci/run).
#
# Usage: benches/connect.sh [ROUNDS] [-- BENCH FLAGS...]   e.g. benches/connect.sh 3 -- --rows 50000
# Environment: CARGO_TARGET_DIR (default ./target), POSTGRES_BIN_DIR (default the newest
# /usr/lib/postgresql/*/bin), KEEP_WORK=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "== $*" >&2; }
busy_note() { echo "note: $*" >&2; }
source benches/lib.sh

rounds=${1:-3}
shift || true
[ "${1:-}" = "--" ] && shift
target=${CARGO_TARGET_DIR:-target}
pgbin=${POSTGRES_BIN_DIR:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
command -v redis-server >/dev/null || { echo "redis-server is missing (apt-get install redis-server)" >&2; exit 1; }

log "building (release)"
cargo build --release --locked -p syncline-broker -p syncline-connect --bins >&2

work=$(mktemp -d /tmp/syncline-connect-bench.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -n "${pgdata:-}" ] && as_pg "$pgbin/pg_ctl" -D "$pgdata" -m immediate stop >/dev/null 2>&1 || true
  [ "${KEEP_WORK:-}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT

# PostgreSQL refuses to run as root: run it as the postgres user then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
read -r pgport redisport < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
pgdata=$work/pg
mkdir -p "$pgdata"
[ "$(id -u)" = 0 ] && chown postgres "$pgdata"
log "PostgreSQL on 127.0.0.1:$pgport (durable: fsync on, synchronous_commit on)"
as_pg "$pgbin/initdb" -D "$pgdata" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null
as_pg "$pgbin/pg_ctl" -D "$pgdata" -l "$pgdata/log" -w -o "-p $pgport -k $pgdata -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10" start >/dev/null
pg_url="postgres://postgres@127.0.0.1:$pgport/postgres"

log "Redis on 127.0.0.1:$redisport"
redis-server --port "$redisport" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)

log "broker"
"$target/release/syncline-broker" --data-dir "$work/broker" --listen 127.0.0.1:0 >"$work/broker.log" 2>&1 &
pids+=($!)
wait_listening "$work/broker.log" "${pids[-1]}"
broker=$(listen_addr "$work/broker.log")

for round in $(seq 1 "$rounds"); do
  quiet
  log "round $round of $rounds"
  "$target/release/syncline-connect-bench" --broker "$broker" --pg-url "$pg_url" \
    --redis-url "redis://127.0.0.1:$redisport/" --connect-bin "$target/release/syncline-connect" \
    --recvlogical "$pgbin/pg_recvlogical" \
    --json "$@" | tee -a "$work/results.jsonl"
done
python3 - "$work/results.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(f): return statistics.median(f(r) for r in runs)
def spread(f): v = [f(r) for r in runs]; return f"{min(v):.2f}-{max(v):.2f}"
print(f"\n{len(runs)} rounds, medians (spread):")
print(f"database alone            {med(lambda r: r['database_alone_rows_per_s']):>10.0f} rows/s")
if all(r.get('recvlogical_rows_per_s') for r in runs):
    print(f"pg_recvlogical > /dev/null {med(lambda r: r['recvlogical_rows_per_s']):>10.0f} rows/s  ratio {med(lambda r: r['recvlogical_rows_per_s'] / r['database_alone_rows_per_s']):.2f}x")
print(f"captured end to end       {med(lambda r: r['captured_changes_per_s']):>10.0f} changes/s  ratio {med(lambda r: r['captured_ratio']):.2f}x ({spread(lambda r: r['captured_ratio'])})")
print(f"lag at full rate          p50 {med(lambda r: r['full_rate_lag_ms']['p50']):.0f} ms  p99 {med(lambda r: r['full_rate_lag_ms']['p99']):.0f} ms")
print(f"lag at half rate          p50 {med(lambda r: r['half_rate_lag_ms']['p50']):.0f} ms  p99 {med(lambda r: r['half_rate_lag_ms']['p99']):.0f} ms")
print(f"postgres sink / plain     {med(lambda r: r['postgres_sink']['ratio']):.2f}x ({spread(lambda r: r['postgres_sink']['ratio'])}); sink {med(lambda r: r['postgres_sink']['sink_rows_per_s']):.0f} rows/s, plain {med(lambda r: r['postgres_sink']['plain_rows_per_s']):.0f}")
if all(r.get('redis_sink') for r in runs):
    print(f"redis sink / plain        {med(lambda r: r['redis_sink']['ratio']):.2f}x ({spread(lambda r: r['redis_sink']['ratio'])}); sink {med(lambda r: r['redis_sink']['sink_rows_per_s']):.0f} rows/s, plain {med(lambda r: r['redis_sink']['plain_rows_per_s']):.0f}")
PY
