#!/usr/bin/env bash
# Syncline next to its peer brokers, on loopback, one server at a time: the same workloads
# (1 producer -> 1 consumer, 100 B and 1 KiB records) against `syncline bench` and against the
# peers that ../shared/peers/ installs (each with its own standard tool), N runs each, medians,
# and Syncline's ratio to each peer, in one table. Not part of CI (.ci/run).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: benches/compare.sh [OPTIONS]

Runs, one server at a time:
  ceilings   raw loopback TCP and a minimal tonic echo (benches/tonic_echo.rs: the broker's HTTP/2
             windows, 8 requests in flight on one stream), and one 4 KiB append + fdatasync
  syncline   `syncline bench --json`, 1 producer + 1 consumer, {100 B, 1 KiB} x {1, 8 partitions}
             x {acks leader, acks durable}, each for --secs; then 100 B / 1 partition at half the
             measured maximum rate (`--rate`, `--linger-ms 0`) for leader and durable; then the
             resident memory of an idle broker holding one topic of 1000 partitions
  peers      ../shared/peers/<peer>.sh start MODE / bench SIZE COUNT / stop, installing the peer
             first if it is missing: redis (none, always), nats (default, always),
             rabbitmq (streams), tansu (memory, sqlite; only with --with-tansu)
Published figures of Iggy and Fluvio (not installable here) are shown as reference rows.

Options:
  --runs N         runs per workload, the table shows medians (default 3)
  --peers LIST     comma-separated peers to run: redis,nats,rabbitmq,tansu or none
                   (default redis,nats,rabbitmq)
  --with-tansu     add tansu to the peers (its install builds from source: ~20 min on 2 cores)
  --quick          1 run, 2 s per Syncline workload, small peer counts (a smoke test)
  --secs S         seconds per Syncline workload (default 6)
  --no-build       use the binaries already in $CARGO_TARGET_DIR/release
  --no-install     do not install missing peers, skip them
  --out FILE       markdown copy of the table (default: $CARGO_TARGET_DIR/compare-results.md)
  -h, --help       this help

Environment: CARGO_TARGET_DIR (default ./target), PEERS_DIR (default ../shared/peers relative to
the repository), PEERS_HOME (where the peer scripts install, default /opt/peers), KEEP_WORK=1
keeps the work directory (raw outputs of every run) instead of deleting it.
Needs python3 (parsing and the table) and curl (broker metrics).
Latency columns are not all the same unit: see the legend under the table.
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS_DIR=${PEERS_DIR:-$ROOT/../shared/peers}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
RUNS=3
PEERS=redis,nats,rabbitmq
QUICK=0
SECS=6
BUILD=1
INSTALL=1
OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift ;;
    --peers) PEERS=$2; shift ;;
    --with-tansu) PEERS=$PEERS,tansu ;;
    --quick) QUICK=1 ;;
    --secs) SECS=$2; shift ;;
    --no-build) BUILD=0 ;;
    --no-install) INSTALL=0 ;;
    --out) OUT=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$PEERS" = none ] && PEERS=""
if [ "$QUICK" = 1 ]; then RUNS=1; SECS=2; fi

WORK=$(mktemp -d /tmp/syncline-compare.XXXXXX)
RESULTS=$WORK/results.tsv
: > "$RESULTS"
OUT=${OUT:-$TARGET/compare-results.md}
BROKER_PID=""
PEER_RUNNING=""

cleanup() {
  stop_broker
  if [ -n "$PEER_RUNNING" ]; then "$PEERS_DIR/$PEER_RUNNING.sh" stop >/dev/null 2>&1 || true; fi
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

log() { echo "[compare $(date +%H:%M:%S)] $*" >&2; }

# quiet: wait for the other load on this machine to pass (benches/lib.sh).
busy_note() { echo -e "note\t\t\t\t\t\t\t\t\t\t\t\t$1" >> "$RESULTS"; }
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# One result row: system mode class size partitions direction run rec/s MB/s p50 p99 lat-unit note
row() { local IFS=$'\t'; echo "$*" >> "$RESULTS"; }

# ------------------------------------------------------------------------------------------------
# Build
if [ "$BUILD" = 1 ]; then
  log "building release binaries into $TARGET"
  (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release --locked -q \
      -p syncline-broker -p syncline-client &&
    CARGO_TARGET_DIR=$TARGET cargo build --release --locked -q --example tonic_echo)
fi
BROKER=$TARGET/release/syncline-broker
CLI=$TARGET/release/syncline
ECHO=$TARGET/release/examples/tonic_echo
for b in "$BROKER" "$CLI" "$ECHO"; do [ -x "$b" ] || { echo "missing $b (build first)" >&2; exit 1; }; done

# ------------------------------------------------------------------------------------------------
# Ceilings
log "ceilings: loopback TCP, tonic echo, fdatasync ($RUNS runs)"
for run in $(seq 1 "$RUNS"); do
  quiet
  "$ECHO" "$([ "$QUICK" = 1 ] && echo 1 || echo 4)" > "$WORK/echo.$run.json"
  python3 - "$WORK/echo.$run.json" "$run" >> "$RESULTS" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); run = sys.argv[2]
print("\t".join(["tcp", "loopback", "ceiling", "", "", "1 MiB writes", run, "",
                 "%.1f" % d["tcp"]["mb_per_sec"], "", "", "", "one stream"]))
for s in d["tonic"]:
    print("\t".join(["tonic-echo", "%dx%dB" % (s["records_per_msg"], s["record_size"]), "ceiling",
                     str(s["record_size"]), "", "produce", run, "%.0f" % s["records_per_sec"],
                     "%.1f" % s["mb_per_sec"], "", "", "",
                     "%d-byte messages, 8 in flight" % s["msg_bytes"]]))
PY
done
# One fdatasync of a 4 KiB append, in the directory the broker uses (/tmp).
python3 - "$WORK" >> "$RESULTS" <<'PY'
import os, sys, time, statistics
fd = os.open(os.path.join(sys.argv[1], "fsync-probe"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
lat = []
for _ in range(50):
    os.write(fd, b"x" * 4096)
    t = time.perf_counter(); os.fdatasync(fd); lat.append((time.perf_counter() - t) * 1e3)
os.close(fd); lat.sort()
print("\t".join(["fdatasync", "4 KiB append", "ceiling", "", "", "fsync", "1", "", "",
                 "%.3f" % statistics.median(lat), "%.3f" % lat[int(len(lat) * 0.99) - 1],
                 "per fdatasync", "50 samples"]))
PY

# ------------------------------------------------------------------------------------------------
# Syncline
start_broker() {  # start_broker NAME: fresh data dir, ephemeral ports; sets ADDR, METRICS
  local dir=$WORK/syncline-$1
  mkdir -p "$dir"
  "$BROKER" --data-dir "$dir/data" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    > "$dir/broker.log" 2>&1 &
  BROKER_PID=$!
  for _ in $(seq 1 300); do
    ADDR=$(grep -v metrics "$dir/broker.log" | grep -oE 'listening on [0-9.]+:[0-9]+' | head -1 |
      awk '{print $3}' || true)
    METRICS=$(grep -oE 'metrics listening on [0-9.]+:[0-9]+' "$dir/broker.log" | head -1 |
      awk '{print $4}' || true)
    [ -n "$ADDR" ] && break
    kill -0 "$BROKER_PID" 2>/dev/null || { cat "$dir/broker.log" >&2; exit 1; }
    sleep 0.1
  done
  [ -n "$ADDR" ] || { echo "broker did not report its address" >&2; cat "$dir/broker.log" >&2; exit 1; }
  log "syncline broker pid $BROKER_PID on $ADDR (metrics ${METRICS:-none})"
}
stop_broker() {
  if [ -n "$BROKER_PID" ] && kill -0 "$BROKER_PID" 2>/dev/null; then
    kill "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true
  fi
  BROKER_PID=""
}
scrape() { curl -sf "http://$METRICS/metrics" > "$1" || : > "$1"; }

# syncline_bench LABEL RUN [bench flags...]: one run, result rows from its JSON and the fsync
# latency percentiles of the broker during the run (from the metrics histogram).
syncline_bench() {
  local label=$1 run=$2; shift 2
  local f=$WORK/syncline.$label.$run
  quiet
  sync; sleep 1   # earlier runs' dirty pages are not written back during this one
  scrape "$f.m0"
  if ! "$CLI" --broker "$ADDR" bench --json "$@" > "$f.json" 2> "$f.err"; then
    log "syncline bench $label run $run failed: $(tail -1 "$f.err")"
  fi
  scrape "$f.m1"
  python3 - "$f" "$label" "$run" >> "$RESULTS" <<'PY'
import json, sys, re
f, label, run = sys.argv[1:4]
def fsync_hist(path):
    b = {}
    for line in open(path):
        m = re.match(r'syncline_fsync_duration_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            b[float("inf") if m[1] == "+Inf" else float(m[1])] = float(m[2])
    return b
def quantile(h, q):  # Prometheus-style linear interpolation inside the bucket
    les = sorted(h); total = h[les[-1]] if les else 0
    if total <= 0: return None
    rank, prev_le, prev_c = q * total, 0.0, 0.0
    for le in les:
        if h[le] >= rank:
            if le == float("inf"): return prev_le * 1e3
            return (prev_le + (le - prev_le) * (rank - prev_c) / max(h[le] - prev_c, 1e-9)) * 1e3
        prev_le, prev_c = le, h[le]
try:
    d = json.load(open(f + ".json"))
except Exception:
    print("\t".join(["syncline", label, "", "", "", "failed", run] + [""] * 6)); sys.exit()
c = d["config"]; acks = c.get("acks", "")
cls = "fsync" if acks == "durable" else "cache"
size, parts = str(c.get("record_size", "")), str(c.get("partitions", ""))
v = d.get("verify", {})
bad = sum(v.get(k, 0) for k in ("lost", "duplicated", "reordered", "corrupt", "produce_errors"))
note = "verified" if v.get("checked") and bad == 0 else ("VERIFY FAILED" if bad else "")
h0, h1 = fsync_hist(f + ".m0"), fsync_hist(f + ".m1")
delta = {le: h1[le] - h0.get(le, 0.0) for le in h1}
p50, p99 = quantile(delta, 0.5), quantile(delta, 0.99)
if p50 is not None:
    note += "; broker fsync p50 %.2f ms p99 %.2f ms (%d fsyncs)" % (p50, p99, delta[float("inf")])
direction = "produce" if "half" not in label else "produce@half"
for name, t in (("produce", d["produce"]), ("consume", d.get("consume"))):
    if not t: continue
    dname = direction if name == "produce" else ("consume" if "half" not in label else "consume@half")
    lat = t["latency_ms"]
    kind = "per record, send->ack" if name == "produce" else "per record, send->consumed"
    batch = d.get("batch_latency_ms") or {}
    if name == "produce" and "half" in label and batch.get("p99"):
        # The target is per batch: produce request -> acknowledgement (syncline bench reports it).
        lat, kind = batch, "per batch, request->ack"
    print("\t".join(["syncline", acks, cls, size, parts, dname, run, "%.0f" % t["records_per_sec"],
                     "%.1f" % t["mb_per_sec"], "%.3f" % lat["p50"], "%.3f" % lat["p99"],
                     kind,
                     note + ("; rate %s/s" % c["rate"] if c.get("rate") else "")]))
if p50 is not None and acks == "durable":
    print("\t".join(["syncline-fsync", acks, cls, size, parts, dname.replace("consume", "fsync"), run,
                     "", "", "%.3f" % p50, "%.3f" % p99, "per group-commit fsync",
                     "%d fsyncs" % delta[float("inf")]]))
PY
}

start_broker bench
for size in 100 1024; do
  for parts in 1 8; do
    for acks in leader durable; do
      log "syncline ${size} B, $parts partition(s), acks $acks ($RUNS x ${SECS} s)"
      for run in $(seq 1 "$RUNS"); do
        syncline_bench "s$size-p$parts-$acks" "$run" --producers 1 --consumers 1 \
          --partitions "$parts" --record-size "$size" --duration "$SECS" --acks "$acks"
      done
    done
  done
done

# Half of the measured maximum (median of the runs above), 100 B, 1 partition.
median_rate() {  # median_rate ACKS
  python3 - "$RESULTS" "$1" <<'PY'
import sys, statistics
rates = [float(r[7]) for r in (l.rstrip("\n").split("\t") for l in open(sys.argv[1]))
         if len(r) > 7 and r[0] == "syncline" and r[1] == sys.argv[2] and r[3] == "100"
         and r[4] == "1" and r[5] == "produce" and r[7]]
print(int(statistics.median(rates) / 2) if rates else 0)
PY
}
for acks in leader durable; do
  rate=$(median_rate "$acks")
  [ "$rate" -gt 0 ] || continue
  log "syncline 100 B, 1 partition, acks $acks at half rate: $rate records/s"
  for run in $(seq 1 "$RUNS"); do
    syncline_bench "s100-p1-$acks-half" "$run" --producers 1 --consumers 1 --partitions 1 \
      --record-size 100 --duration "$SECS" --acks "$acks" --rate "$rate" --linger-ms 0
  done
done
stop_broker

# Idle broker with 1000 partitions (one topic; default config).
log "syncline idle RSS with 1000 partitions"
start_broker idle
sleep 2
rss0=$(awk '/VmRSS/ {print $2}' "/proc/$BROKER_PID/status")
"$CLI" --broker "$ADDR" topic create idle1000 --partitions 1000 > /dev/null
sleep 10
rss1=$(awk '/VmRSS/ {print $2}' "/proc/$BROKER_PID/status")
# then with data in every partition (100 B records spread over all 1000), idle again
"$CLI" --broker "$ADDR" bench --topic idle1000 --partitions 1000 --consumers 0 --acks leader \
  --records "$([ "$QUICK" = 1 ] && echo 100000 || echo 1000000)" --json > "$WORK/idle-fill.json" 2>&1 ||
  log "filling the 1000 partitions failed: $(tail -1 "$WORK/idle-fill.json")"
sleep 10
rss2=$(awk '/VmRSS/ {print $2}' "/proc/$BROKER_PID/status")
stop_broker
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k/1024}'; }
row syncline-rss idle idle "" 1000 "idle RSS" 1 "" "$(mib "$rss1")" "" "" "MiB (MB/s column)" \
  "$(mib "$rss0") MiB before the topic; 1000 empty partitions"
row syncline-rss "idle, after data" idle "" 1000 "idle RSS" 1 "" "$(mib "$rss2")" "" "" \
  "MiB (MB/s column)" "after 100 B records were written to all 1000 partitions, 10 s idle"

# ------------------------------------------------------------------------------------------------
# Peers
peer_installed() {
  case $1 in
    redis) command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null ;;
    nats) [ -x "${PEERS_HOME:-/opt/peers}/bin/natsbench" ] && [ -x "${PEERS_HOME:-/opt/peers}/venv/bin/nats-server" ] ;;
    rabbitmq) command -v rabbitmq-server >/dev/null && [ -d "${PEERS_HOME:-/opt/peers}/rmqjs/node_modules" ] ;;
    tansu) [ -x "${PEERS_HOME:-/opt/peers}/tansu/bin/tansu" ] && [ -x "${PEERS_HOME:-/opt/peers}/bin/rdkafka_performance" ] ;;
    *) return 1 ;;
  esac
}

# peer_bench PEER MODE CLASS SIZE COUNT RUN: one `PEER.sh bench`, parsed into rows.
peer_bench() {
  local peer=$1 mode=$2 cls=$3 size=$4 count=$5 run=$6
  local f=$WORK/$peer.$mode.$size.$run.txt
  quiet
  sync; sleep 1
  if ! timeout 600 "$PEERS_DIR/$peer.sh" bench "$size" "$count" > "$f" 2>&1 < /dev/null; then
    log "$peer bench $size $count failed: $(tail -1 "$f")"
  fi
  python3 - "$f" "$peer" "$mode" "$cls" "$size" "$run" >> "$RESULTS" <<'PY'
import re, sys
f, peer, mode, cls, size, run = sys.argv[1:7]
text = open(f).read()
def out(direction, rate, lat=(None, None), unit="", note=""):
    mb = rate * int(size) / 1e6
    p50, p99 = ("" if x is None else "%.3f" % x for x in lat)
    print("\t".join([peer, mode, cls, size, "1", direction, run, "%.0f" % rate, "%.1f" % mb,
                     p50, p99, unit, note]))
def godur(s):  # Go time.Duration string -> ms
    total = 0.0
    for num, u in re.findall(r"([0-9.]+)(ns|µs|us|ms|s|m|h)", s):
        total += float(num) * {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1, "s": 1e3,
                               "m": 6e4, "h": 3.6e6}[u]
    return total
if peer == "redis":
    # sections: produce (pipeline P), produce latency (pipeline 1), consume (COUNT per read)
    secs = re.split(r"^== ", text, flags=re.M)[1:]
    for sec in secs:
        m = re.search(r"throughput summary: ([0-9.]+) requests per second", sec)
        if not m: continue
        rps = float(m[1])
        nums = re.search(r"avg\s+min\s+p50\s+p95\s+p99\s+max\s*\n\s*([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)"
                         r"\s+([0-9.]+)\s+([0-9.]+)", sec)
        lat = (float(nums[3]), float(nums[5])) if nums else (None, None)
        if sec.startswith("XADD produce"):
            p = re.search(r"pipeline=(\d+)", sec)[1]
            out("produce", rps, lat, "per XADD, pipeline %s" % p)
        elif sec.startswith("XADD latency"):
            out("produce 1-in-flight", rps, lat, "per XADD, pipeline 1")
        elif sec.startswith("XREADGROUP"):
            c = int(re.search(r"COUNT=(\d+)", sec)[1])
            out("consume", rps * c, lat, "per XREADGROUP of %d" % c)
elif peer == "nats":
    names = {"js-pub": "produce", "js-sub": "consume", "js-sync-pub": "produce 1-in-flight",
             "core-pub": "core publish (no persistence)"}
    for name, direction in names.items():
        m = re.search(r"^%s: msgs=\d+ size=\d+B elapsed=[0-9.]+s rate=([0-9.]+) msgs/s" % name,
                      text, re.M)
        if not m: continue
        l = re.search(r"^%s latency \(per ([^,]+), \d+ samples\):.* p50=(\S+) p90=\S+ p99=(\S+)" % name,
                      text, re.M)
        lat = (godur(l[2]), godur(l[3])) if l else (None, None)
        out(direction, float(m[1]), lat, ("per " + l[1]) if l else "")
elif peer == "rabbitmq":
    for name, direction in (("rmq-stream-pub", "produce"), ("rmq-stream-sub", "consume")):
        m = re.search(r"^%s: msgs=\d+ size=\d+B elapsed=[0-9.]+s rate=([0-9.]+) msgs/s" % name,
                      text, re.M)
        if m: out(direction, float(m[1]), unit="(no latency reported)")
elif peer == "tansu":
    m = re.findall(r"([0-9.]+) msgs/s", text)
    for direction, rate in zip(("produce", "consume"), m):
        out(direction, float(rate), unit="(rdkafka_performance)")
PY
}

peer_cases() {  # peer_cases PEER: lines "MODE CLASS SIZE COUNT" (counts as bench_all.sh, smaller)
  local s=1 # quick mode divides the counts by 10
  [ "$QUICK" = 1 ] && s=10
  case $1 in
    redis) echo "none cache 100 $((2000000/s))"; echo "none cache 1024 $((1000000/s))"
           echo "always fsync 100 $((1000000/s))"; echo "always fsync 1024 $((300000/s))" ;;
    nats) echo "default cache 100 $((1000000/s))"; echo "default cache 1024 $((500000/s))"
          echo "always fsync 100 $((50000/s))"; echo "always fsync 1024 $((50000/s))" ;;
    rabbitmq) echo "stream cache 100 $((1000000/s))"; echo "stream cache 1024 $((500000/s))" ;;
    tansu) echo "memory cache 100 $((2000000/s))"; echo "memory cache 1024 $((1000000/s))"
           echo "sqlite cache 100 $((1000000/s))"; echo "sqlite cache 1024 $((500000/s))" ;;
  esac
}

IFS=, read -r -a PEER_LIST <<< "$PEERS"
for peer in "${PEER_LIST[@]}"; do
  [ -n "$peer" ] || continue
  [ -x "$PEERS_DIR/$peer.sh" ] || { log "no $PEERS_DIR/$peer.sh: skipping $peer"; continue; }
  if ! peer_installed "$peer"; then
    if [ "$INSTALL" = 1 ]; then
      log "installing $peer"
      "$PEERS_DIR/$peer.sh" install > "$WORK/$peer.install.log" 2>&1 ||
        log "$peer install failed: $(tail -1 "$WORK/$peer.install.log")"
    fi
    peer_installed "$peer" || { log "$peer not installed: skipping";
      row "$peer" "-" "" "" "" "not installed" 1 "" "" "" "" "" "install failed or skipped"; continue; }
  fi
  current=""
  while read -r mode cls size count; do
    if [ "$mode" != "$current" ]; then
      [ -n "$current" ] && "$PEERS_DIR/$peer.sh" stop > /dev/null < /dev/null
      log "$peer: start $mode"
      PEER_RUNNING=$peer
      "$PEERS_DIR/$peer.sh" start "$mode" > "$WORK/$peer.$mode.start.log" 2>&1 < /dev/null ||
        { log "$peer start $mode failed"; cat "$WORK/$peer.$mode.start.log" >&2; current=""; continue; }
      current=$mode
    fi
    log "$peer $mode: $size B x $count ($RUNS runs)"
    for run in $(seq 1 "$RUNS"); do peer_bench "$peer" "$mode" "$cls" "$size" "$count" "$run"; done
  done < <(peer_cases "$peer")   # (the peer commands above read /dev/null, not this list)
  "$PEERS_DIR/$peer.sh" stop >/dev/null || true
  PEER_RUNNING=""
done

# ------------------------------------------------------------------------------------------------
# The table
python3 - "$RESULTS" "$OUT" "$RUNS" <<'PY'
import statistics, sys
results, out, runs = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [l.rstrip("\n").split("\t") for l in open(results) if l.strip()]
notes = [r[12] for r in rows if r[0] == "note"]
rows = [r for r in rows if r[0] != "note"]
def num(x):
    try: return float(x)
    except ValueError: return None
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
groups = {}
for r in rows:
    groups.setdefault(tuple(r[:6]), []).append(r)
agg = {}
for key, rs in groups.items():
    agg[key] = dict(rec=med([num(r[7]) for r in rs]), mb=med([num(r[8]) for r in rs]),
                    p50=med([num(r[9]) for r in rs]), p99=med([num(r[10]) for r in rs]),
                    unit=rs[0][11], note=rs[-1][12], n=len(rs),
                    spread=[num(r[7]) for r in rs if num(r[7])])
# Published figures (../shared/peers/README.md: 2 cores, client and server together), midpoints.
published = [
    ("iggy*", "batches of 1000", "cache", "100", "1", "produce", 2.6e6, "2.3-2.9 M/s"),
    ("iggy*", "batches of 1000", "cache", "100", "1", "consume", 3.4e6, "3.3-3.4 M/s"),
    ("iggy*", "batches of 1000", "cache", "1024", "1", "produce", 1.0e6, "1.0 M/s (1.04 GB/s)"),
    ("iggy*", "batches of 1000", "cache", "1024", "1", "consume", 1.15e6, "1.1-1.2 M/s"),
    ("iggy*", "--enforce-fsync", "fsync-after-ack", "100", "1", "produce", 1.14e6,
     "1.14-1.27 M/s; fsync every 1024 msgs, after the ack"),
    ("iggy*", "--enforce-fsync", "fsync-after-ack", "1024", "1", "produce", 388e3, "384-392 k/s"),
    ("fluvio*", "0.18", "cache", "100", "1", "produce", 1.1e6, ""),
    ("fluvio*", "0.18", "cache", "100", "1", "consume", 630e3, "CLI-bound"),
    ("fluvio*", "0.18", "cache", "1024", "1", "produce", 177e3, ""),
    ("fluvio*", "0.18", "cache", "1024", "1", "consume", 330e3, ""),
]
for sysname, mode, cls, size, parts, d, rate, note in published:
    agg[(sysname, mode, cls, size, parts, d)] = dict(
        rec=rate, mb=rate * int(size) / 1e6, p50=None, p99=None, unit="",
        note="published, not run here; " + note, n=0, spread=[])
def syncline(cls, size, d, parts="1"):
    acks = "durable" if cls.startswith("fsync") else "leader"
    a = agg.get(("syncline", acks, "fsync" if acks == "durable" else "cache", size, parts, d))
    return a["rec"] if a else None
def fmt_rate(x):
    if x is None: return ""
    return "%.2f M" % (x / 1e6) if x >= 1e6 else ("%.0f k" % (x / 1e3) if x >= 1e4 else "%.0f" % x)
def fmt(x, p=2):
    return "" if x is None else ("%.*f" % (p, x))
order = {"tcp": 0, "tonic-echo": 1, "fdatasync": 2, "syncline": 3, "syncline-fsync": 4,
         "syncline-rss": 5}
def sortkey(k):
    sysname, mode, cls, size, parts, d = k
    return (order.get(sysname, 10), sysname.endswith("*"), sysname, cls, mode,
            int(size or 0), int(parts or 0), d)
table = []
for k in sorted(agg, key=sortkey):
    sysname, mode, cls, size, parts, d = k
    if sysname == "syncline" and mode == "idle": continue
    a = agg[k]
    ratio = ""
    if not sysname.startswith(("syncline", "tcp", "tonic", "fdatasync")) and a["rec"]:
        if d in ("produce", "consume"):
            s = syncline(cls, size, d)
            if s: ratio = "%.2fx" % (s / a["rec"])
    elif sysname == "tonic-echo" and a["mb"]:
        s = agg.get(("syncline", "leader", "cache", size, "1", "produce"))
        if s and s["mb"]: ratio = "%.2fx (Syncline p1 leader MB/s / this)" % (s["mb"] / a["mb"])
    workload = ("%s B" % size if size else "") + (" p%s" % parts if parts else "")
    spread = ""
    if len(a["spread"]) > 1:
        spread = " [%s..%s]" % (fmt_rate(min(a["spread"])), fmt_rate(max(a["spread"])))
    lat_unit = a["unit"] if (a["p50"] is not None or sysname == "syncline-rss") else ""
    table.append([sysname, mode, cls, workload.strip(), d, fmt_rate(a["rec"]) + spread,
                  fmt(a["mb"], 1), fmt(a["p50"], 3), fmt(a["p99"], 3), ratio,
                  (lat_unit + ("; " if lat_unit and a["note"] else "") + a["note"])[:110]])
head = ["system", "mode", "acks", "workload", "direction", "records/s (median [min..max])", "MB/s",
        "p50 ms", "p99 ms", "Syncline / peer", "latency unit; notes"]
widths = [max(len(str(r[i])) for r in table + [head]) for i in range(len(head))]
line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
text = [line(head), line(["-" * w for w in widths])] + [line(r) for r in table]
print("\n".join(text))
md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
md += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in table]
# Targets, from the issue.
def g(*k): return agg.get(k)
v = []
def verdict(name, ok, detail):
    v.append("- %s: %s (%s)" % (name, "met" if ok else "NOT met", detail))
s100 = g("syncline", "leader", "cache", "100", "1", "produce")
c100 = g("syncline", "leader", "cache", "100", "1", "consume")
if s100:
    verdict("acks leader, 100 B produce >= Iggy 2.3-2.9 M/s", s100["rec"] >= 2.3e6,
            "%s/s, %.2fx of 2.6 M/s" % (fmt_rate(s100["rec"]), s100["rec"] / 2.6e6))
if c100:
    verdict("acks leader, 100 B consume >= Iggy 3.4 M/s", c100["rec"] >= 3.4e6,
            "%s/s, %.2fx" % (fmt_rate(c100["rec"]), c100["rec"] / 3.4e6))
s1k = g("syncline", "leader", "cache", "1024", "1", "produce")
e1k = g("tonic-echo", "256x1024B", "ceiling", "1024", "", "produce")
if s1k and e1k:
    verdict("acks leader, 1 KiB produce >= 0.9 x tonic echo ceiling", s1k["mb"] >= 0.9 * e1k["mb"],
            "%.0f MB/s vs ceiling %.0f MB/s = %.2fx; Iggy 1040 MB/s" % (s1k["mb"], e1k["mb"], s1k["mb"] / e1k["mb"]))
c1k = g("syncline", "leader", "cache", "1024", "1", "consume")
if c1k:
    verdict("acks leader, 1 KiB consume (Iggy 1.1 GB/s)", c1k["mb"] >= 1100,
            "%.0f MB/s = %.2fx of Iggy" % (c1k["mb"], c1k["mb"] / 1100))
d100 = g("syncline", "durable", "fsync", "100", "1", "produce")
if d100:
    verdict("durable acks, 100 B >= 1 M records/s", d100["rec"] >= 1e6,
            "%s/s; Redis always runs %s/s here" % (fmt_rate(d100["rec"]),
            fmt_rate((g("redis", "always", "fsync", "100", "1", "produce") or {}).get("rec"))))
d100p8 = g("syncline", "durable", "fsync", "100", "8", "produce")
if d100p8:
    verdict("durable acks, 100 B, 8 partitions >= 1 M records/s", d100p8["rec"] >= 1e6,
            "%s/s" % fmt_rate(d100p8["rec"]))
hl = g("syncline", "leader", "cache", "100", "1", "produce@half")
if hl:
    verdict("acks leader p99 at half rate <= 2 ms", hl["p99"] is not None and hl["p99"] <= 2,
            "p99 %.2f ms, p50 %.2f ms at %s/s" % (hl["p99"], hl["p50"], fmt_rate(hl["rec"])))
hd = g("syncline", "durable", "fsync", "100", "1", "produce@half")
fs = g("syncline-fsync", "durable", "fsync", "100", "1", "fsync@half")
if hd and fs and fs["p50"]:
    verdict("durable p99 at half rate <= 3 x fsync p50 of the same run", hd["p99"] <= 3 * fs["p50"],
            "p99 %.2f ms vs 3 x %.2f ms = %.2f ms at %s/s" % (hd["p99"], fs["p50"], 3 * fs["p50"], fmt_rate(hd["rec"])))
rss = g("syncline-rss", "idle", "idle", "", "1000", "idle RSS")
rss2 = g("syncline-rss", "idle, after data", "idle", "", "1000", "idle RSS")
if rss and rss2:
    verdict("idle broker with 1000 partitions <= 200 MiB RSS", max(rss["mb"], rss2["mb"]) <= 200,
            "%.1f MiB empty, %.1f MiB after data was written to every partition" % (rss["mb"], rss2["mb"]))
legend = """
Legend: medians of %s run(s). MB = 10^6 bytes of record values. "Syncline / peer" = Syncline's
median records/s in the same direction, record size and ack class (1 partition) divided by the
peer's. acks: cache = acknowledged after the page cache; fsync = fsync before the ack;
fsync-after-ack = Iggy's periodic fsync. Systems marked * are published figures from
../shared/peers/README.md, not run here. Latency units differ: Syncline per record (send -> ack,
which includes the producer's linger and queueing at full speed; @half = --rate at half the
measured maximum with --linger-ms 0; consume = send -> consumed), Redis per pipelined request,
NATS per window/fetch of 1000 messages or per single publish, RabbitMQ none.""" % runs
print(legend)
print("\nTargets:\n" + "\n".join(v))
if notes: print("\nNotes:\n" + "\n".join("- " + n for n in notes))
with open(out, "w") as fh:
    fh.write("\n".join(md) + "\n" + legend + "\n\nTargets:\n\n" + "\n".join(v) + "\n")
    if notes: fh.write("\nNotes:\n\n" + "\n".join("- " + n for n in notes) + "\n")
PY
echo "markdown table: $OUT" >&2
