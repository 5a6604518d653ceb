#!/usr/bin/env bash
# Syncline beside Apache Iggy in the same run: the five workloads of issue 20, alternating the
# two systems round by round, each run on a fresh server, and the pairwise ratios.
# Not part of CI (.ci/run). Iggy is never built by this script: see ../shared/peers/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: IGGY_BIN=DIR IGGY_CONFIG=FILE benches/iggy.sh [OPTIONS]

Runs, for each round, every workload on both systems (one after the other, the first one
alternating between rounds), each on a fresh server with a fresh data directory on loopback,
1 partition, 1 producer (and 1 consumer):

  produce 100 B        syncline bench --acks leader --consumers 0   | iggy-bench pinned-producer
  produce+consume 100 B  ... --consumers 1 (consume rates compared) | pinned-producer-and-consumer
  produce 1 KiB        as above, --record-size 1KiB                 | --message-size 1024
  produce+consume 1 KiB
  durable 100 B        syncline --acks durable (fsync before the ack) | iggy --enforce-fsync

Iggy sends batches of 1000 messages (--messages-per-batch 1000); Syncline's producer batches
up to 1 MiB with a 5 ms linger. Rates are records per second as each tool reports them (both
count from the first send to the last acknowledgement or record consumed). The table shows
medians with min-max, and the median of the per-round ratios Syncline / Iggy with their
spread. It also shows each side's CPU seconds per GB of records (server and bench client,
from /proc and /usr/bin/time), which says how much of the two shared cores a byte costs.

Options:
  --rounds N     rounds (default 3; medians need 3 or more)
  --scale F      multiply the record counts (default 1: 5 M records of 100 B, 2 M of 1 KiB,
                 2 M durable; --scale 0.1 for a smoke test)
  --no-build     use the Syncline binaries already in $CARGO_TARGET_DIR/release
  --out FILE     markdown copy of the table (default: $CARGO_TARGET_DIR/iggy-results.md)
  -h, --help     this help

Environment:
  IGGY_BIN       directory holding iggy-server and iggy-bench (required)
  IGGY_CONFIG    Iggy's stock server config, core/server/config.toml of its source (required)
  CARGO_TARGET_DIR (default ./target); KEEP_WORK=1 keeps the raw outputs.
Needs python3 and /usr/bin/time.
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
ROUNDS=3
SCALE=1
BUILD=1
OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift ;;
    --scale) SCALE=$2; shift ;;
    --no-build) BUILD=0 ;;
    --out) OUT=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
: "${IGGY_BIN:?set IGGY_BIN to the directory of iggy-server and iggy-bench (see --help)}"
: "${IGGY_CONFIG:?set IGGY_CONFIG to the core/server/config.toml of Iggy (see --help)}"
for b in "$IGGY_BIN/iggy-server" "$IGGY_BIN/iggy-bench"; do
  [ -x "$b" ] || { echo "missing $b" >&2; exit 1; }
done
[ -f "$IGGY_CONFIG" ] || { echo "missing $IGGY_CONFIG" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 1; }

if [ "$BUILD" = 1 ]; then
  echo "[iggy] building Syncline release binaries into $TARGET" >&2
  (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release --locked -q \
    -p syncline-broker -p syncline-client)
fi
BROKER=$TARGET/release/syncline-broker
CLI=$TARGET/release/syncline
for b in "$BROKER" "$CLI"; do [ -x "$b" ] || { echo "missing $b (build first)" >&2; exit 1; }; done
OUT=${OUT:-$TARGET/iggy-results.md}
WORK=$(mktemp -d /tmp/syncline-iggy.XXXXXX)
RESULTS=$WORK/results.tsv
: > "$RESULTS"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
log() { echo "[iggy $(date +%H:%M:%S)] $*" >&2; }
# shellcheck source=benches/lib.sh
busy_note() { log "$1"; }
source "$ROOT/benches/lib.sh"

count() { python3 -c "print(max(1000, int($1 * $SCALE) // 1000 * 1000))"; }
# workload: name size consumers acks records
WORKLOADS=(
  "produce-100B 100 0 leader $(count 5000000)"
  "produce+consume-100B 100 1 leader $(count 5000000)"
  "produce-1KiB 1024 0 leader $(count 2000000)"
  "produce+consume-1KiB 1024 1 leader $(count 2000000)"
  "durable-100B 100 0 durable $(count 2000000)"
)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# row: system workload round records_per_sec server_cpu_s client_cpu_s bytes
row() { local IFS=$'\t'; echo "$*" >> "$RESULTS"; }

run_syncline() {  # run_syncline NAME SIZE CONSUMERS ACKS RECORDS ROUND
  local name=$1 size=$2 consumers=$3 acks=$4 records=$5 round=$6 dir=$WORK/s.$1.$6 addr=""
  mkdir -p "$dir"
  quiet; sync; sleep 1
  "$BROKER" --data-dir "$dir/data" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    > "$dir/broker.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 300); do
    addr=$(grep -v metrics "$dir/broker.log" | grep -oE 'listening on [0-9.]+:[0-9]+' | head -1 |
      awk '{print $3}' || true)
    [ -n "$addr" ] && break
    sleep 0.05
  done
  [ -n "$addr" ] || { cat "$dir/broker.log" >&2; exit 1; }
  local t0; t0=$(cpu_ticks "$SERVER_PID")
  if ! /usr/bin/time -f "%U %S" -o "$dir/time" "$CLI" --broker "$addr" bench --json \
      --partitions 1 --producers 1 --consumers "$consumers" --record-size "$size" \
      --acks "$acks" --records "$records" > "$dir/out.json" 2> "$dir/err"; then
    log "syncline $name round $round failed: $(tail -1 "$dir/err")"
  fi
  local t1; t1=$(cpu_ticks "$SERVER_PID")
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
  python3 - "$dir" "$name" "$round" "$t0" "$t1" "$consumers" >> "$RESULTS" <<'PY'
import json, sys
d, name, rnd, t0, t1, consumers = sys.argv[1:7]
try:
    j = json.load(open(d + "/out.json"))
except Exception:
    sys.exit(0)
v = j.get("verify", {})
bad = sum(v.get(k, 0) for k in ("lost", "duplicated", "reordered", "corrupt", "produce_errors"))
if bad:
    print("syncline %s round %s: verification failed (%s): left out" % (name, rnd, v), file=sys.stderr)
    sys.exit(0)
side = j["consume"] if consumers != "0" else j["produce"]
client = sum(map(float, open(d + "/time").read().split()))
print("\t".join(map(str, ["syncline", name, rnd, side["records_per_sec"],
                           (int(t1) - int(t0)) / 100, client, j["produce"]["bytes"]])))
PY
  rm -rf "$dir/data"
}

run_iggy() {  # run_iggy NAME SIZE CONSUMERS ACKS RECORDS ROUND
  local name=$1 size=$2 consumers=$3 acks=$4 records=$5 round=$6 dir=$WORK/i.$1.$6
  mkdir -p "$dir"
  quiet; sync; sleep 1
  IGGY_CONFIG_PATH=$IGGY_CONFIG IGGY_ROOT_USERNAME=iggy IGGY_ROOT_PASSWORD=iggy \
    IGGY_SYSTEM_PATH=$dir/data IGGY_TCP_ADDRESS=127.0.0.1:0 IGGY_HTTP_ENABLED=false \
    IGGY_QUIC_ENABLED=false IGGY_WEBSOCKET_ENABLED=false \
    "$IGGY_BIN/iggy-server" > "$dir/server.log" 2>&1 &
  SERVER_PID=$!
  local addr=""
  for _ in $(seq 1 600); do
    addr=$(sed 's/\x1b\[[0-9;]*m//g' "$dir/server.log" |
      grep -oE 'Client listener \(TCP\) accepting on Some\([0-9.]+:[0-9]+' | head -1 |
      grep -oE '[0-9.]+:[0-9]+$' || true)
    [ -n "$addr" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -5 "$dir/server.log" >&2; exit 1; }
    sleep 0.05
  done
  [ -n "$addr" ] || { tail -5 "$dir/server.log" >&2; exit 1; }
  local mode=pinned-producer
  local -a actors=(--producers 1) fsync=()
  if [ "$consumers" != 0 ]; then
    mode=pinned-producer-and-consumer
    actors=(--producers 1 --consumers 1)
  fi
  if [ "$acks" = durable ]; then fsync=(--enforce-fsync); fi
  local t0; t0=$(cpu_ticks "$SERVER_PID")
  if ! /usr/bin/time -f "%U %S" -o "$dir/time" "$IGGY_BIN/iggy-bench" --message-size "$size" \
      --messages-per-batch 1000 --message-batches $((records / 1000)) "${fsync[@]}" \
      "$mode" --streams 1 "${actors[@]}" tcp --server-address "$addr" > "$dir/out" 2>&1; then
    log "iggy $name round $round failed: $(tail -1 "$dir/out")"
  fi
  local t1; t1=$(cpu_ticks "$SERVER_PID")
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
  python3 - "$dir" "$name" "$round" "$t0" "$t1" "$consumers" "$size" "$records" >> "$RESULTS" <<'PY'
import re, sys
d, name, rnd, t0, t1, consumers, size, records = sys.argv[1:9]
out = re.sub(r"\x1b\[[0-9;]*m", "", open(d + "/out", errors="replace").read())
which = "Consumers" if consumers != "0" else "Producers"
m = re.search(which + r" Results: Total throughput: [0-9.]+ MB/s, ([0-9.]+) messages/s", out)
if not m:
    sys.exit(0)
client = sum(map(float, open(d + "/time").read().split()))
print("\t".join(map(str, ["iggy", name, rnd, float(m[1]), (int(t1) - int(t0)) / 100, client,
                           int(size) * int(records)])))
PY
  rm -rf "$dir/data"
}

for round in $(seq 1 "$ROUNDS"); do
  for w in "${WORKLOADS[@]}"; do
    read -r name size consumers acks records <<< "$w"
    log "round $round: $name ($records records)"
    if [ $((round % 2)) = 1 ]; then
      run_syncline "$name" "$size" "$consumers" "$acks" "$records" "$round"
      run_iggy "$name" "$size" "$consumers" "$acks" "$records" "$round"
    else
      run_iggy "$name" "$size" "$consumers" "$acks" "$records" "$round"
      run_syncline "$name" "$size" "$consumers" "$acks" "$records" "$round"
    fi
  done
done

python3 - "$RESULTS" "$ROUNDS" > "$OUT" <<'PY'
import statistics, sys
from collections import defaultdict
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
rate = defaultdict(dict); cpu = defaultdict(list)
for system, name, rnd, rps, server, client, nbytes in rows:
    rate[(system, name)][rnd] = float(rps)
    gb = float(nbytes) / 1e9
    cpu[(system, name)].append(((float(server) + float(client)) / gb, float(server) / gb))
names = ["produce-100B", "produce+consume-100B", "produce-1KiB", "produce+consume-1KiB",
         "durable-100B"]
targets = {"produce-100B": 1.2, "produce+consume-100B": None, "produce-1KiB": 1.0,
           "produce+consume-1KiB": 1.0, "durable-100B": 2.0}
def spread(values, fmt):
    values = sorted(values)
    return (fmt % statistics.median(values)) + " (" + (fmt % values[0]) + "-" + (fmt % values[-1]) + ")"
print("| workload | Iggy rec/s | Syncline rec/s | Syncline / Iggy | target | CPU s/GB Iggy (server) | CPU s/GB Syncline (server) |")
print("|---|---|---|---|---|---|---|")
for name in names:
    i, s = rate[("iggy", name)], rate[("syncline", name)]
    ratios = [s[r] / i[r] for r in s if r in i and i[r] > 0]
    if not ratios:
        print(f"| {name} | - | - | - | - | - | - |"); continue
    t = targets[name]
    verdict = "" if t is None else (f">= {t}x " + ("met" if statistics.median(ratios) >= t else "**not met**"))
    def c(system):
        v = cpu[(system, name)]
        return "%.2f (%.2f)" % (statistics.median(x for x, _ in v), statistics.median(y for _, y in v))
    print(f"| {name} | {spread(i.values(), '%.0f')} | {spread(s.values(), '%.0f')} | "
          f"{spread(ratios, '%.2f')}x | {verdict} | {c('iggy')} | {c('syncline')} |")
print()
print(f"{sys.argv[2]} rounds, alternating; medians (min-max); ratios are per round. "
      "produce+consume rows compare consume rates. CPU: server + bench client seconds per GB of "
      "records (server alone in brackets).")
PY
cat "$OUT"
