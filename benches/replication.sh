#!/usr/bin/env bash
# Replicated partitions (issue 15) against a single node, in one run on one machine: produce rate
# at replication factor 3 with durable acks, produce latency per batch at half of that rate next
# to one fsync, leader failover time over repeated kill -9, the idle cost of 1,000 replicated
# partitions, and (issue 16) a rolling restart of the 3 nodes under a steady load: how long it
# takes and the produce latency during it next to the same load without restarts. The three
# nodes share this machine's cores and disk with each other and with the client, so the ratios
# show what replication costs here, not how a cluster of machines performs.
# Not part of CI (.ci/run).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: benches/replication.sh [OPTIONS]

Starts release binaries: one single-node broker (no --cluster, replication factor 1) and one
cluster of 3 broker processes on 127.0.0.1 (ports chosen up front, a data dir each,
--default-replication-factor 3, the shipped election settings), then measures, in one run:

  produce   `syncline bench --json --acks durable` against the single node, and against the
            cluster with `--broker <all 3 addresses> --replication-factor 3` (durable = fsync'd on
            a majority of the 3 replicas), 100 B and 1 KiB records, --partitions partitions,
            --producers producers, --consumers consumers, --secs each. Records/s; the target is
            cluster / single >= 0.5x. Beside it, the bytes all brokers of the target had written
            to storage during the run (write_bytes of /proc/PID/io) per produced byte: the
            replicas share this machine's one disk, which bounds the ratio.
  latency   the same bench at half of the produce part's median records/s of the same target and
            size (`--rate`, `--linger-ms 0`): p99 of the produce latency per batch (`syncline
            bench` reports it as batch_latency_ms: from the request handed to the connection to
            its acknowledgement, first attempts only; it leaves out linger and the wait for an
            in-flight slot). Beside it, each run, one fsync's p99 on this disk: 1000 x (4 KiB
            append + fdatasync) in the work directory. Target for R=3: p99 <= 2 ms + fsync p99.
            Needs the produce part's rates: `--only latency` runs the produce part too.
  failover  on the cluster, a topic of 1 partition at R=3, --kills times: find its leader
            (`syncline cluster status --json`), run benches/failover_producer.rs (one record at
            a time, acks durable, a line per acknowledgement), `kill -9` the leader (the time is
            read by bash's $EPOCHREALTIME right before the kill, the producer's clock), and take
            the time from the kill to the acknowledgement of the first record sent after the
            kill (so it cannot be an answer the dead leader had already sent; its offset must be
            past every offset acknowledged before the kill). Then restart the killed node and wait
            until cluster status lists every replica as caught up. p50 and max; targets p50 <= 1 s,
            max <= 3 s. The figure includes the client's retry backoff (every 50 ms while the
            leader is gone: unreachable, UNAVAILABLE or NotLeader; 100 ms doubling to 1 s otherwise)
            and its refresh of the cluster view, as an application sees it.
  idle      a fresh single node and a fresh 3-node cluster: CPU (utime+stime from /proc/PID/stat,
            % of one core) and RSS of every broker over --idle-secs, once before any topic, then
            after --topics topics x --topic-partitions partitions were created through one client
            connection (benches/create_topics.rs; R=3 on the cluster, 1,000 partitions by
            default), every partition has a leader, and --settle-secs passed. Targets per node:
            <= 10% of a core and <= 300 MiB.
  rolling   on the cluster, `syncline bench --json --acks durable --rate --rolling-rate` (100 B
            records, a fresh topic of --rolling-partitions partitions at R=3, --producers
            producers, --consumers consumers) for --rolling-secs, twice per run: `steady` as it
            is, and `rolling` with a rolling restart of all 3 nodes starting 2 s after the
            bench's first progress line: node 1, 2, 3 in turn get SIGTERM (which hands their
            leaderships to caught-up followers), are waited for to exit, started again (same
            port and data dir), and waited for until every replicated partition has a leader
            and every replica caught up (`cluster status --json`, polled every 0.2 s) before the
            next; then until every replicated partition is led by its preferred (first) replica
            again (the brokers move leaderships back once they are 10 s old). Figures: the
            restart's duration (first SIGTERM to the last node caught up), the time until the
            leaders are back, and each node's stop, start and catch-up times; per record send ->
            ack p99 and max
            (retries included: what an application waits) and per batch p99 (first attempts
            only) of the whole bench run, steady against rolling; the bench's produce errors
            (target 0: nothing beyond the client's retries). A restart (leaders back included)
            longer than the bench run is noted (raise --rolling-secs). The restart covers only
            part of each rolling run, so its p99 is that of a run holding a restart, not of the
            restart alone.

Runs of produce and latency alternate single/cluster (odd runs single first, even runs cluster
first), and so do the steady and rolling runs of the rolling part (odd runs steady first); the
table shows medians and [min..max] of --runs runs, each cluster figure's ratio to the single node
of the same run (rolling: to the steady runs), and the target.

Options:
  --runs N              runs per produce and latency measurement, medians shown (default 3)
  --secs S              seconds per produce and latency run (default 6)
  --partitions N        partitions of the bench topics (default 1)
  --producers N         bench producers (default 1)
  --consumers N         bench consumers (default 0: produce only, nothing read back)
  --kills N             leader kills in the failover part (default 10)
  --idle-secs S         seconds per idle sample (default 20)
  --settle-secs S       wait after every partition has a leader, before the idle sample (default 10)
  --topics N            topics of the idle part (default 10)
  --topic-partitions N  partitions per topic of the idle part (default 100)
  --rolling-rate R      records/s of the rolling part's load (default 50000)
  --rolling-secs S      seconds per rolling-part bench run (default 30)
  --rolling-partitions N  partitions of the rolling part's topic (default 3: one led by each node)
  --only LIST           comma-separated parts: produce,latency,failover,idle,rolling (default all)
  --quick               1 run, 2 s per bench run, 3 kills, 5 s idle samples, 25 s rolling runs
                        (a smoke test)
  --no-build            use the binaries already in $CARGO_TARGET_DIR/release
  --out FILE            markdown copy of the table (default: $CARGO_TARGET_DIR/replication-results.md)
  -h, --help            this help

Environment: CARGO_TARGET_DIR (default ./target); KEEP_WORK=1 keeps the work directory (broker
logs and data, raw outputs, the failover producers' lines) instead of deleting it. Needs bash 5
($EPOCHREALTIME) and python3. LATENCY_RATES="single:100=R cluster:100=R single:1024=R
cluster:1024=R" pins the latency part's rates (records/s) instead of half of the produce part's:
to compare two builds at the same rates.
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
RUNS=3
SECS=6
PARTITIONS=1
PRODUCERS=1
CONSUMERS=0
KILLS=10
IDLE_SECS=20
SETTLE_SECS=10
TOPICS=10
TOPIC_PARTITIONS=100
ROLLING_RATE=50000
ROLLING_SECS=30
ROLLING_PARTITIONS=3
ONLY=produce,latency,failover,idle,rolling
NODES=3
REPLICATION=3
BUILD=1
OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift ;;
    --secs) SECS=$2; shift ;;
    --partitions) PARTITIONS=$2; shift ;;
    --producers) PRODUCERS=$2; shift ;;
    --consumers) CONSUMERS=$2; shift ;;
    --kills) KILLS=$2; shift ;;
    --idle-secs) IDLE_SECS=$2; shift ;;
    --settle-secs) SETTLE_SECS=$2; shift ;;
    --topics) TOPICS=$2; shift ;;
    --topic-partitions) TOPIC_PARTITIONS=$2; shift ;;
    --rolling-rate) ROLLING_RATE=$2; shift ;;
    --rolling-secs) ROLLING_SECS=$2; shift ;;
    --rolling-partitions) ROLLING_PARTITIONS=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --quick) RUNS=1; SECS=2; KILLS=3; IDLE_SECS=5; ROLLING_SECS=25 ;;
    --no-build) BUILD=0 ;;
    --out) OUT=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$TARGET/replication-results.md}
[ -n "${EPOCHREALTIME:-}" ] || { echo "needs bash 5 (\$EPOCHREALTIME)" >&2; exit 2; }
for part in ${ONLY//,/ }; do
  case $part in produce|latency|failover|idle|rolling) ;; *) echo "--only: unknown part $part" >&2; exit 2 ;; esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }
# The latency part runs at half of the produce part's rates.
if want latency && ! want produce; then ONLY=produce,$ONLY; fi

WORK=$(mktemp -d /tmp/syncline-replication-bench.XXXXXX)
RESULTS=$WORK/results.tsv
: > "$RESULTS"
SINGLE_PID=""
SINGLE_ADDR=""
CLUSTER_NAME=""       # the cluster's directory under $WORK
CLUSTER_PIDS=()       # by node id - 1
CLUSTER_PORTS=()      # by node id - 1
CLUSTER_VOTERS=""     # the --cluster list
CLUSTER_ADDRS=""      # comma-separated, node 1 first; empty when the cluster is not running
CLUSTER_REASON=""     # why the cluster is not running
NODE_STARTS=()        # starts of each node so far (each start logs to its own file)
PRODUCER_PID=""

cleanup() {
  local pid
  for pid in $PRODUCER_PID $SINGLE_PID "${CLUSTER_PIDS[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[replication $(date +%H:%M:%S)] $*" >&2; }

# One result row: kind target param1 param2 run value1 value2 note
#   produce  TARGET SIZE - RUN records/s MB/s note
#   latency  TARGET SIZE RATE RUN batch-p99-ms batch-p50-ms note
#   fsync    - - - RUN p99-ms p50-ms note
#   failover cluster KILL LEADER-NODE - ms-to-first-ack-of-a-record-sent-after-the-kill
#            ms-to-first-ack-after-the-kill-past-the-last-offset note
#   idle     LABEL(single|node-I) PHASE - 1 %core RSS-MiB note
#   create   TARGET TOPICS PARTITIONS 1 seconds seconds-until-every-partition-has-a-leader note
#   rolling  cluster MODE(steady|rolling) RATE RUN record-p99-ms batch-p99-ms note
#            restart-s(rolling) record-max-ms produce-errors record-p50-ms batch-p50-ms
#            per-node "I:STOP_S/START_S/CATCH_UP_S" list(rolling) leaders-back-s(rolling)
#   note     - - - - - - text
row() { local IFS=$'\t'; echo "$*" >> "$RESULTS"; }

# quiet, wait_listening, listen_addr, free_ports, agreed_controller, cpu_rss: benches/lib.sh.
busy_note() { row note - - - - - - "$1"; }
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# ------------------------------------------------------------------------------------------------
# Build
if [ "$BUILD" = 1 ]; then
  log "building release binaries into $TARGET"
  (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release --locked -q --workspace --bins &&
    CARGO_TARGET_DIR=$TARGET cargo build --release --locked -q --example create_topics \
      --example failover_producer)
fi
BROKER=$TARGET/release/syncline-broker
CLI=$TARGET/release/syncline
CREATE=$TARGET/release/examples/create_topics
FAILOVER_PRODUCER=$TARGET/release/examples/failover_producer
for b in "$BROKER" "$CLI" "$CREATE" "$FAILOVER_PRODUCER"; do
  [ -x "$b" ] || { echo "missing $b (build first)" >&2; exit 1; }
done

# ------------------------------------------------------------------------------------------------
# Brokers

# start_single NAME: a fresh single broker in $WORK/NAME.
start_single() {
  local dir=$WORK/$1
  mkdir -p "$dir"
  "$BROKER" --data-dir "$dir/data" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    > "$dir/broker.log" 2>&1 &
  SINGLE_PID=$!
  wait_listening "$dir/broker.log" "$SINGLE_PID" ||
    { cat "$dir/broker.log" >&2; echo "the single broker did not start" >&2; exit 1; }
  SINGLE_ADDR=$(listen_addr "$dir/broker.log")
  log "single broker pid $SINGLE_PID on $SINGLE_ADDR"
}

stop_single() {
  [ -n "$SINGLE_PID" ] || return 0
  kill "$SINGLE_PID" 2>/dev/null || true
  wait "$SINGLE_PID" 2>/dev/null || true
  SINGLE_PID=""
  SINGLE_ADDR=""
}

# node_log I: the log file of node I's latest start.
node_log() { echo "$WORK/$CLUSTER_NAME/node-$1/broker.${NODE_STARTS[$(($1 - 1))]}.log"; }

# spawn_node I: starts node I of the current cluster (first start or restart: same port, data
# dir and voter list); does not wait for it.
spawn_node() {
  local i=$1 port=${CLUSTER_PORTS[$(($1 - 1))]} dir=$WORK/$CLUSTER_NAME/node-$1
  mkdir -p "$dir"
  NODE_STARTS[$((i - 1))]=$((${NODE_STARTS[$((i - 1))]:-0} + 1))
  "$BROKER" --data-dir "$dir/data" --listen "127.0.0.1:$port" --advertise "127.0.0.1:$port" \
    --metrics-listen 127.0.0.1:0 --node-id "$i" --cluster "$CLUSTER_VOTERS" \
    --default-replication-factor "$REPLICATION" > "$(node_log "$i")" 2>&1 &
  CLUSTER_PIDS[$((i - 1))]=$!
}

stop_cluster() {
  local pid
  for pid in "${CLUSTER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${CLUSTER_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  CLUSTER_PIDS=()
  CLUSTER_ADDRS=""
}

# start_cluster NAME: a fresh cluster of $NODES nodes in $WORK/NAME. Sets CLUSTER_PIDS and
# CLUSTER_ADDRS, or CLUSTER_REASON.
start_cluster() {
  local i controller
  CLUSTER_NAME=$1
  CLUSTER_VOTERS=""
  CLUSTER_ADDRS=""
  NODE_STARTS=()
  read -r -a CLUSTER_PORTS <<< "$(free_ports "$NODES")"
  local addrs=""
  for i in $(seq 1 "$NODES"); do
    CLUSTER_VOTERS=$CLUSTER_VOTERS${CLUSTER_VOTERS:+,}$i=127.0.0.1:${CLUSTER_PORTS[$((i - 1))]}
    addrs=$addrs${addrs:+,}127.0.0.1:${CLUSTER_PORTS[$((i - 1))]}
  done
  # Spawn every node before waiting for any: a node may wait for its peers before it serves.
  for i in $(seq 1 "$NODES"); do spawn_node "$i"; done
  for i in $(seq 1 "$NODES"); do
    if ! wait_listening "$(node_log "$i")" "${CLUSTER_PIDS[$((i - 1))]}"; then
      CLUSTER_REASON="node $i did not start: $(grep -m1 -i 'error' "$(node_log "$i")" ||
        tail -1 "$(node_log "$i")")"
      stop_cluster
      return 1
    fi
  done
  CLUSTER_ADDRS=$addrs
  controller=$(agreed_controller "$CLI" "$CLUSTER_ADDRS")
  if [ -z "$controller" ]; then
    CLUSTER_REASON="the $NODES nodes agreed on no controller within 60 s"
    stop_cluster
    return 1
  fi
  log "cluster $1 of $NODES: pids ${CLUSTER_PIDS[*]} on $CLUSTER_ADDRS, controller node $controller"
}

# alive_addrs: the addresses of the cluster's nodes whose process runs, comma-separated.
alive_addrs() {
  local i addrs=""
  for i in $(seq 1 "${#CLUSTER_PIDS[@]}"); do
    kill -0 "${CLUSTER_PIDS[$((i - 1))]}" 2>/dev/null &&
      addrs=$addrs${addrs:+,}127.0.0.1:${CLUSTER_PORTS[$((i - 1))]}
  done
  echo "$addrs"
}

# check_alive: a broker process that is gone (crashed, or ended from outside the script) ends the
# run when it is the single node, and the cluster half (noted) when it is a cluster node.
check_alive() {
  local i
  if [ -n "$SINGLE_PID" ] && ! kill -0 "$SINGLE_PID" 2>/dev/null; then
    log "the single broker (pid $SINGLE_PID) is gone; its log ends:"
    tail -3 "$WORK"/single*/broker.log >&2
    exit 1
  fi
  for i in $(seq 1 "${#CLUSTER_PIDS[@]}"); do
    if ! kill -0 "${CLUSTER_PIDS[$((i - 1))]}" 2>/dev/null; then
      CLUSTER_REASON="node $i (pid ${CLUSTER_PIDS[$((i - 1))]}) is gone mid-run; its log ends: $(tail -1 "$(node_log "$i")")"
      log "cluster half stopped: $CLUSTER_REASON"
      row note - - - - - - "cluster half stopped: $CLUSTER_REASON"
      stop_cluster
      return 0
    fi
  done
}

# targets RUN: the running systems, in run order (odd runs: single first, even: cluster first).
targets() {
  if [ -z "$CLUSTER_ADDRS" ]; then echo single
  elif [ $(($1 % 2)) = 1 ]; then echo single cluster
  else echo cluster single
  fi
}
address_of() { if [ "$1" = single ]; then echo "$SINGLE_ADDR"; else echo "$CLUSTER_ADDRS"; fi; }

# partition_state TOPIC: "LEADER CONTROLLER REPLICAS CAUGHT-UP" of partition 0 of TOPIC as a
# live node reports it (node lists comma-separated, `-` when unknown or empty); empty when no
# node answered within 10 s.
partition_state() {
  timeout 10 "$CLI" --broker "$(alive_addrs)" cluster status --json 2>/dev/null |
    python3 -c '
import json, sys
d = json.load(sys.stdin)
ids = lambda xs: ",".join(str(x) for x in sorted(xs)) or "-"
for p in d["partitions"]:
    if p["topic"] == sys.argv[1] and p["partition"] == 0:
        print(p["leader"] or "-", d.get("controller") or "-", ids(p["replicas"]), ids(p["caught_up"]))
' "$1" 2>/dev/null || true
}

# wait_caught_up TOPIC SECS: until partition 0 of TOPIC has a leader and every replica caught up;
# prints its state (as partition_state), or nothing after SECS.
wait_caught_up() {
  local state leader controller replicas caught deadline=$((SECONDS + $2))
  while [ $SECONDS -lt $deadline ]; do
    state=$(partition_state "$1")
    read -r leader controller replicas caught <<< "${state:-- - - -}"
    if [ "$leader" != - ] && [ "$replicas" != - ] && [ "$replicas" = "$caught" ]; then
      echo "$state"
      return 0
    fi
    sleep 0.5
  done
}

# ------------------------------------------------------------------------------------------------
# Measurements

# bench TARGET FILE [flags...]: one `syncline bench --json --acks durable` run into FILE.json;
# the cluster's topic gets the replication factor.
bench() {
  local target=$1 f=$2; shift 2
  local extra=()
  [ "$target" = cluster ] && extra=(--replication-factor "$REPLICATION")
  quiet
  sync; sleep 1   # earlier runs' dirty pages are not written back during this one
  if ! "$CLI" --broker "$(address_of "$target")" bench --json --acks durable \
      --producers "$PRODUCERS" --consumers "$CONSUMERS" --partitions "$PARTITIONS" \
      --duration "$SECS" "${extra[@]}" "$@" > "$f.json" 2> "$f.err"; then
    log "bench $target $* failed: $(tail -1 "$f.err")"
  fi
}

# note_of FILE.json: the verification note of a bench report (or `failed`).
VERIFY_NOTE='
def note_of(d):
    v = d.get("verify", {})
    bad = sum(v.get(k, 0) for k in ("lost", "duplicated", "reordered", "corrupt", "produce_errors"))
    if v.get("checked"):
        return "VERIFY FAILED" if bad else "verified"
    return "%d produce errors" % v["produce_errors"] if v.get("produce_errors") else ""
'

# produce TARGET SIZE RUN: the maximum rate.
# written_bytes TARGET: bytes the target's broker processes have had written to storage so far
# (write_bytes of /proc/PID/io: counted when a page is dirtied; fsync'd or written back later).
written_bytes() {
  local pids=() pid total=0 n
  if [ "$1" = cluster ]; then pids=("${CLUSTER_PIDS[@]}"); else pids=("$SINGLE_PID"); fi
  for pid in "${pids[@]}"; do
    n=$(awk '$1 == "write_bytes:" { print $2 }' "/proc/$pid/io" 2>/dev/null)
    total=$((total + ${n:-0}))
  done
  echo "$total"
}

produce() {
  local target=$1 size=$2 run=$3 f=$WORK/produce.$1.$2.$3 before after
  check_alive
  [ "$target" = cluster ] && [ -z "$CLUSTER_ADDRS" ] && return 0
  before=$(written_bytes "$target")
  bench "$target" "$f" --record-size "$size"
  after=$(written_bytes "$target")
  python3 - "$f.json" "$target" "$size" "$run" "$((after - before))" >> "$RESULTS" <<PY
import json, sys
$VERIFY_NOTE
f, target, size, run, written = sys.argv[1:6]
try:
    d = json.load(open(f))
except Exception:
    print("\t".join(["produce", target, size, "-", run, "", "", "failed"])); sys.exit()
p = d["produce"]
amplification = "%.3f" % (int(written) / p["bytes"]) if p["bytes"] else ""
print("\t".join(["produce", target, size, "-", run, "%.0f" % p["records_per_sec"],
                 "%.1f" % p["mb_per_sec"], note_of(d), amplification]))
PY
}

# half_rate TARGET SIZE: half of the median produce records/s (0 when there is none), or the
# rate LATENCY_RATES pins for TARGET and SIZE (e.g. LATENCY_RATES="single:100=1260000
# cluster:100=510000": to compare two builds at the same rates, not at half of each one's own).
half_rate() {
  local pinned
  for pinned in ${LATENCY_RATES:-}; do
    if [ "${pinned%%=*}" = "$1:$2" ]; then echo "${pinned#*=}"; return; fi
  done
  python3 - "$RESULTS" "$1" "$2" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
rates = [float(r[5]) for r in rows if r[0] == "produce" and r[1] == sys.argv[2]
         and r[2] == sys.argv[3] and r[5]]
print(int(statistics.median(rates) / 2) if rates else 0)
PY
}

# latency TARGET SIZE RATE RUN: produce latency per batch at RATE records/s.
latency() {
  local target=$1 size=$2 rate=$3 run=$4 f=$WORK/latency.$1.$2.$4
  check_alive
  [ "$target" = cluster ] && [ -z "$CLUSTER_ADDRS" ] && return 0
  [ "$rate" -gt 0 ] || { row note - - - - - - "latency $target $size B: no produce rate to halve"; return 0; }
  bench "$target" "$f" --record-size "$size" --rate "$rate" --linger-ms 0
  python3 - "$f.json" "$target" "$size" "$rate" "$run" >> "$RESULTS" <<PY
import json, sys
$VERIFY_NOTE
f, target, size, rate, run = sys.argv[1:6]
try:
    d = json.load(open(f))
except Exception:
    print("\t".join(["latency", target, size, rate, run, "", "", "failed"])); sys.exit()
b, p = d["batch_latency_ms"], d["produce"]
note = "sent %.0f/s of %s/s; per record send->ack p99 %.2f ms" % (
    p["records_per_sec"], rate, p["latency_ms"]["p99"])
if note_of(d): note += "; " + note_of(d)
print("\t".join(["latency", target, size, rate, run, "%.3f" % b["p99"], "%.3f" % b["p50"], note]))
PY
}

# fsync_probe RUN: 1000 x (4 KiB append + fdatasync) in the work directory (the brokers' disk).
fsync_probe() {
  quiet
  python3 - "$WORK" "$1" >> "$RESULTS" <<'PY'
import os, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
lat = []
for _ in range(1000):
    os.write(fd, b"x" * 4096)
    t = time.perf_counter(); os.fdatasync(fd); lat.append((time.perf_counter() - t) * 1e3)
os.close(fd); os.unlink(path); lat.sort()
print("\t".join(["fsync", "-", "-", "-", sys.argv[2], "%.3f" % lat[989], "%.3f" % lat[499],
                 "1000 x (4 KiB append + fdatasync), max %.2f ms" % lat[-1]]))
PY
}

# failover_kill K TOPIC: one kill of TOPIC's leader while a producer writes, and the restart.
# Returns 1 when the failover part cannot go on.
failover_kill() {
  local k=$1 topic=$2 state leader controller replicas caught pid t_kill kill_us f=$WORK/failover.$1
  local deadline
  state=$(wait_caught_up "$topic" 120)
  if [ -z "$state" ]; then
    row note - - - - - - "failover: before kill $k, $topic had no leader with every replica caught up within 120 s"
    return 1
  fi
  read -r leader controller replicas caught <<< "$state"
  sleep 1
  "$FAILOVER_PRODUCER" --broker "$CLUSTER_ADDRS" --topic "$topic" --secs 300 \
    > "$f.out" 2> "$f.err" &
  PRODUCER_PID=$!
  # A second of acknowledged writes before the kill.
  deadline=$((SECONDS + 30))
  until grep -q '^ack ' "$f.out" 2>/dev/null; do
    if ! kill -0 "$PRODUCER_PID" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
      row note - - - - - - "failover: kill $k: the producer acknowledged nothing before the kill: $(tail -1 "$f.err")"
      kill "$PRODUCER_PID" 2>/dev/null || true; wait "$PRODUCER_PID" 2>/dev/null || true
      PRODUCER_PID=""
      return 1
    fi
    sleep 0.05
  done
  sleep 1
  pid=${CLUSTER_PIDS[$((leader - 1))]}
  t_kill=$EPOCHREALTIME
  kill -9 "$pid"
  kill_us=${t_kill/./}
  wait "$pid" 2>/dev/null || true
  log "kill $k: killed node $leader (pid $pid; controller: node $controller)"
  # Until a record sent after the kill is acknowledged (the producer's delivery timeout is 30 s).
  deadline=$((SECONDS + 40))
  until awk -v k="$kill_us" '$1 == "ack" && $2 > k { found = 1; exit } END { exit !found }' "$f.out"; do
    [ $SECONDS -ge $deadline ] && break
    kill -0 "$PRODUCER_PID" 2>/dev/null || break
    sleep 0.05
  done
  sleep 0.5
  kill "$PRODUCER_PID" 2>/dev/null || true
  wait "$PRODUCER_PID" 2>/dev/null || true
  PRODUCER_PID=""
  python3 - "$f.out" "$kill_us" "$k" "$leader" "$controller" >> "$RESULTS" <<'PY'
import statistics, sys, time
f, kill_us, k, leader, controller = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
acks, errors = [], 0
for line in open(f):
    w = line.split()
    if len(w) >= 5 and w[0] == "ack":
        acks.append((int(w[1]), int(w[2]), int(w[4])))
    elif w and w[0] == "err" and len(w) >= 3 and int(w[2]) > kill_us:
        errors += 1
before = [a for a in acks if a[1] <= kill_us]
if not before:
    print("\t".join(["failover", "cluster", k, leader, "-", "", "", "no acknowledgement before the kill"]))
    sys.exit()
last = max(a[2] for a in before)
rtt = statistics.median((a[1] - a[0]) / 1e3 for a in before[-200:])
sent_after = next((a for a in acks if a[0] > kill_us), None)
past = next((a for a in acks if a[1] > kill_us and a[2] > last), None)
killed_at = time.strftime("%H:%M:%S", time.gmtime(kill_us // 1000000)) + ".%03d" % (kill_us // 1000 % 1000)
note = "leader node %s%s killed at %s UTC; %d acks before (last offset %d, ack p50 %.2f ms)" % (
    leader, " (also the controller)" if leader == controller else "", killed_at, len(before), last, rtt)
if errors:
    note += "; %d failed sends after the kill" % errors
if sent_after is None:
    note += "; NO record sent after the kill was acknowledged"
elif sent_after[2] <= last:
    note += "; OFFSET %d NOT PAST %d" % (sent_after[2], last)
ms = lambda a: "%.1f" % ((a[1] - kill_us) / 1e3) if a else ""
print("\t".join(["failover", "cluster", k, leader, "-", ms(sent_after), ms(past), note]))
PY
  log "kill $k: $(tail -1 "$RESULTS" | cut -f6) ms to the first acknowledgement of a record sent after it"
  # Restart the killed node; wait for it to catch up before the next kill.
  spawn_node "$leader"
  if ! wait_listening "$(node_log "$leader")" "${CLUSTER_PIDS[$((leader - 1))]}"; then
    row note - - - - - - "failover: node $leader did not restart after kill $k: $(tail -1 "$(node_log "$leader")")"
    return 1
  fi
  if [ -z "$(wait_caught_up "$topic" 120)" ]; then
    row note - - - - - - "failover: after kill $k, node $leader did not catch up within 120 s"
    return 1
  fi
}

failover() {
  local topic=failover-$$ k
  check_alive
  [ -n "$CLUSTER_ADDRS" ] || return 0
  if ! timeout 30 "$CLI" --broker "$CLUSTER_ADDRS" topic create "$topic" --partitions 1 \
      --replication-factor "$REPLICATION" > /dev/null 2> "$WORK/failover.create.err"; then
    row note - - - - - - "failover: cannot create $topic: $(tail -1 "$WORK/failover.create.err")"
    return 0
  fi
  log "failover: $KILLS kills of the leader of $topic (1 partition, R=$REPLICATION)"
  for k in $(seq 1 "$KILLS"); do
    failover_kill "$k" "$topic" || break
  done
}

# idle_sample PHASE: CPU and RSS of the single broker and every cluster node over IDLE_SECS.
idle_sample() {
  local labels=single pids=$SINGLE_PID i
  check_alive
  for i in $(seq 1 "${#CLUSTER_PIDS[@]}"); do
    labels="$labels node-$i"
    pids="$pids ${CLUSTER_PIDS[$((i - 1))]}"
  done
  log "idle ($1): $labels over ${IDLE_SECS} s"
  cpu_rss "$IDLE_SECS" "$labels" "$pids" | while IFS=$'\t' read -r label share rss elapsed; do
    row idle "$label" "$1" - 1 "$share" "$rss" "$elapsed s"
  done
}

# partitions_led PREFIX: "TOTAL LED": the partitions of the topics named PREFIX-* in the cluster,
# and how many of them have a leader ("0 0" when no node answered).
partitions_led() {
  timeout 30 "$CLI" --broker "$(alive_addrs)" cluster status --json 2>/dev/null |
    python3 -c '
import json, sys
ps = [p for p in json.load(sys.stdin)["partitions"] if p["topic"].startswith(sys.argv[1] + "-")]
print(len(ps), sum(1 for p in ps if p["leader"]))
' "$1" 2>/dev/null || echo 0 0
}

# create_idle TARGET: the idle part's topics, one client connection, kept; on the cluster, then
# waits (up to 300 s) until each of their partitions has a leader. Sets IDLE_PARTITIONS to the
# partitions the cluster holds (fewer than asked when a create failed).
IDLE_PARTITIONS=$((TOPICS * TOPIC_PARTITIONS))
create_idle() {
  local target=$1 f=$WORK/create.$1 extra=() t0 total=0 led=0 deadline
  [ "$target" = cluster ] && extra=(--replication-factor "$REPLICATION")
  t0=$(date +%s.%N)
  if ! "$CREATE" --broker "$(address_of "$target")" --topics "$TOPICS" \
      --partitions "$TOPIC_PARTITIONS" --prefix idle "${extra[@]}" --keep > "$f.json" 2> "$f.err"; then
    row note - - - - - - "idle: creating the topics on the $target failed: $(grep -m1 -A3 '^Error' "$f.err" | tr '\n' ' ')"
  fi
  if [ "$target" = cluster ]; then
    deadline=$((SECONDS + 300))
    while [ $SECONDS -lt $deadline ]; do
      read -r total led <<< "$(partitions_led idle)"
      [ "$total" -gt 0 ] && [ "$led" -ge "$total" ] && break
      sleep 1
    done
    [ "$total" -gt 0 ] && [ "$led" -ge "$total" ] ||
      row note - - - - - - "idle: only $led of $total partitions had a leader after 300 s"
    IDLE_PARTITIONS=$total
  fi
  python3 - "$f.json" "$target" "$t0" "$(date +%s.%N)" "$total" "$led" >> "$RESULTS" <<'PY'
import json, sys
f, target, t0, t1, total, led = sys.argv[1:7]
try:
    d = json.load(open(f))
except Exception:
    d = None
lead = "%.1f" % (float(t1) - float(t0)) if target == "cluster" else ""
note = "%s retries of transient failures" % d.get("retries", 0) if d else "failed"
if target == "cluster":
    note += "; %s of %s partitions with a leader" % (led, total)
print("\t".join(["create", target, str(d["topics"]) if d else "", str(d["partitions"]) if d else "",
                 "1", "%.2f" % d["secs"] if d else "", lead, note]))
PY
}

idle() {
  log "idle: a fresh single node and a fresh cluster"
  start_single single-idle
  if ! start_cluster idle; then
    log "idle: cluster skipped: $CLUSTER_REASON"
    row note - - - - - - "idle: cluster skipped: $CLUSTER_REASON"
  fi
  sleep 5   # let the start settle
  idle_sample fresh
  log "idle: $TOPICS topics x $TOPIC_PARTITIONS partitions on each (R=$REPLICATION on the cluster)"
  create_idle single
  [ -n "$CLUSTER_ADDRS" ] && create_idle cluster
  log "idle: every partition has a leader; settling ${SETTLE_SECS} s"
  sleep "$SETTLE_SECS"
  idle_sample "$IDLE_PARTITIONS partitions"
  stop_cluster
  stop_single
}

# wait_all_caught_up SECS: until every replicated partition (more than one replica) of the
# cluster has a leader and every replica caught up, as a live node reports it (0), or SECS passed
# (1).
wait_all_caught_up() {
  local deadline=$((SECONDS + $1))
  while [ $SECONDS -lt $deadline ]; do
    if timeout 10 "$CLI" --broker "$(alive_addrs)" cluster status --json 2>/dev/null |
      python3 -c '
import json, sys
ps = [p for p in json.load(sys.stdin)["partitions"] if len(p["replicas"]) > 1]
sys.exit(0 if ps and all(p["leader"] and sorted(p["caught_up"]) == sorted(p["replicas"]) for p in ps) else 1)
' 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}

# wait_preferred_leaders SECS: until every replicated partition of the cluster is led by its
# preferred replica (the first of its list) (0), or SECS passed (1).
wait_preferred_leaders() {
  local deadline=$((SECONDS + $1))
  while [ $SECONDS -lt $deadline ]; do
    if timeout 10 "$CLI" --broker "$(alive_addrs)" cluster status --json 2>/dev/null |
      python3 -c '
import json, sys
ps = [p for p in json.load(sys.stdin)["partitions"] if len(p["replicas"]) > 1]
sys.exit(0 if ps and all(p["leader"] == p["replicas"][0] for p in ps) else 1)
' 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}

# rolling_restart FILE: every cluster node in turn: SIGTERM, wait for it to exit, start it again,
# wait until every replica is caught up; then until the leaders are back on their preferred
# replicas. Appends "I T_TERM T_EXITED T_LISTENING T_CAUGHT_UP EXIT" per node and then
# "leaders T_BACK" to FILE (times from $EPOCHREALTIME). Returns 1 (noted) when a node does not
# come back or the leaders do not within 60 s.
rolling_restart() {
  local f=$1 i pid t_term t_exit t_listen exit_status
  for i in $(seq 1 "$NODES"); do
    pid=${CLUSTER_PIDS[$((i - 1))]}
    t_term=$EPOCHREALTIME
    kill -TERM "$pid"
    exit_status=0
    wait "$pid" 2>/dev/null || exit_status=$?
    t_exit=$EPOCHREALTIME
    spawn_node "$i"
    if ! wait_listening "$(node_log "$i")" "${CLUSTER_PIDS[$((i - 1))]}"; then
      row note - - - - - - "rolling: node $i did not restart: $(tail -1 "$(node_log "$i")")"
      return 1
    fi
    t_listen=$EPOCHREALTIME
    if ! wait_all_caught_up 60; then
      row note - - - - - - "rolling: after the restart of node $i, a replica was not caught up within 60 s"
      return 1
    fi
    echo "$i $t_term $t_exit $t_listen $EPOCHREALTIME $exit_status" >> "$f"
    log "rolling: node $i stopped (exit $exit_status), restarted and caught up"
  done
  if ! wait_preferred_leaders 60; then
    row note - - - - - - "rolling: the leaders were not back on their preferred replicas within 60 s"
    return 1
  fi
  echo "leaders $EPOCHREALTIME" >> "$f"
  log "rolling: every partition led by its preferred replica again"
}

# rolling_run MODE RUN: one bench run of ROLLING_SECS at ROLLING_RATE on the cluster; MODE
# `rolling` restarts every node during it, `steady` does not.
rolling_run() {
  local mode=$1 run=$2 f=$WORK/rolling.$1.$2 status=0 deadline first_progress=
  check_alive
  [ -n "$CLUSTER_ADDRS" ] || return 0
  quiet
  sync; sleep 1
  : > "$f.restart"
  "$CLI" --broker "$CLUSTER_ADDRS" bench --json --acks durable --producers "$PRODUCERS" \
    --consumers "$CONSUMERS" --partitions "$ROLLING_PARTITIONS" --replication-factor "$REPLICATION" \
    --record-size 100 --rate "$ROLLING_RATE" --duration "$ROLLING_SECS" > "$f.json" 2> "$f.err" &
  PRODUCER_PID=$!
  if [ "$mode" = rolling ]; then
    # The topic is created and the load steady (the first progress line), then 2 s more.
    deadline=$((SECONDS + 60))
    until grep -q '^bench: ' "$f.err" 2>/dev/null; do
      { [ $SECONDS -ge $deadline ] || ! kill -0 "$PRODUCER_PID" 2>/dev/null; } && break
      sleep 0.1
    done
    first_progress=$EPOCHREALTIME
    sleep 2
    log "rolling run $run: restarting nodes 1..$NODES in turn under $ROLLING_RATE records/s"
    rolling_restart "$f.restart" || true
  fi
  wait "$PRODUCER_PID" || status=$?
  PRODUCER_PID=""
  [ "$status" = 0 ] || log "rolling: bench ($mode, run $run) exited with $status: $(tail -1 "$f.err")"
  python3 - "$f" "$mode" "$ROLLING_RATE" "$run" "$status" "$ROLLING_SECS" "$first_progress" \
    >> "$RESULTS" <<PY
import json, re, sys
$VERIFY_NOTE
f, mode, rate, run, status, secs, first_progress = sys.argv[1:8]
try:
    d = json.load(open(f + ".json"))
except Exception:
    err = open(f + ".err").read().strip().splitlines()
    print("\t".join(["rolling", "cluster", mode, rate, run, "", "", "failed: %s" % (err[-1] if err else "?")]))
    sys.exit()
p, b = d["produce"], d["batch_latency_ms"]
# Each second's acknowledged records/s from the progress lines, the first and last left out
# (start-up and the drain at the end).
per_second = [float(m.group(1)) for m in re.finditer(r"^bench: \d+ s: produced \d+ \((\d+) records/s\)",
              open(f + ".err").read(), re.M)][1:-1]
note = "sent %.0f/s of %s/s" % (p["records_per_sec"], rate)
if per_second:
    note += "; slowest second %.0f/s" % min(per_second)
if note_of(d): note += "; " + note_of(d)
if status != "0": note += "; bench exit status " + status
restart, nodes, back = "", "", ""
if mode == "rolling":
    lines = [l.split() for l in open(f + ".restart") if l.strip()]
    backs = [float(l[1]) for l in lines if l[0] == "leaders"]
    lines = [l for l in lines if l[0] != "leaders"]
    if lines and backs:
        back = "%.2f" % (backs[0] - float(lines[0][1]))
    if lines:
        restart = "%.2f" % (float(lines[-1][4]) - float(lines[0][1]))
        nodes = " ".join("%s:%.2f/%.2f/%.2f%s" % (l[0], float(l[2]) - float(l[1]), float(l[3]) - float(l[2]),
                         float(l[4]) - float(l[3]), "" if l[5] == "0" else "(exit %s)" % l[5]) for l in lines)
    if len(lines) < 3:
        note += "; ONLY %d of 3 nodes restarted and caught up" % len(lines)
    elif first_progress:
        # The bench sends for --rolling-secs from about 1 s before its first progress line.
        end = backs[0] if backs else float(lines[-1][4])
        over = end - (float(first_progress) - 1 + float(secs))
        if over > 0:
            note += "; THE RESTART OUTLASTED THE BENCH'S SENDING by %.1f s (raise --rolling-secs)" % over
        else:
            note += "; the restart spanned %.0f%% of the run (with the leaders' return %s%%)" % (
                100 * float(restart) / float(secs),
                "%.0f" % (100 * float(back) / float(secs)) if back else "?")
print("\t".join(["rolling", "cluster", mode, rate, run, "%.3f" % p["latency_ms"]["p99"], "%.3f" % b["p99"],
                 note, restart, "%.3f" % p["latency_ms"]["max"], str(d.get("verify", {}).get("produce_errors", 0)),
                 "%.3f" % p["latency_ms"]["p50"], "%.3f" % b["p50"], nodes, back]))
PY
}

rolling() {
  local run mode modes
  log "rolling: $RUNS x (steady, rolling restart) at $ROLLING_RATE records/s of 100 B, $ROLLING_PARTITIONS partitions, R=$REPLICATION, ${ROLLING_SECS} s each"
  for run in $(seq 1 "$RUNS"); do
    if [ $((run % 2)) = 1 ]; then modes="steady rolling"; else modes="rolling steady"; fi
    for mode in $modes; do rolling_run "$mode" "$run"; done
  done
}

# ------------------------------------------------------------------------------------------------
# The run
if want produce || want latency || want failover || want rolling; then
  want produce && start_single single
  if ! start_cluster main; then
    log "cluster half skipped: $CLUSTER_REASON"
    row note - - - - - - "cluster half skipped: $CLUSTER_REASON"
  fi
fi

if want produce; then
  for size in 100 1024; do
    log "produce ${size} B, acks durable, $PARTITIONS partition(s) ($RUNS x ${SECS} s each)"
    for run in $(seq 1 "$RUNS"); do
      for target in $(targets "$run"); do produce "$target" "$size" "$run"; done
    done
  done
fi

if want latency; then
  for run in $(seq 1 "$RUNS"); do fsync_probe "$run"; done
  for size in 100 1024; do
    log "latency ${size} B at half the maximum: single $(half_rate single "$size")/s, cluster $(half_rate cluster "$size")/s"
    for run in $(seq 1 "$RUNS"); do
      for target in $(targets "$run"); do
        latency "$target" "$size" "$(half_rate "$target" "$size")" "$run"
      done
    done
  done
fi

want failover && failover
want rolling && rolling
stop_cluster
stop_single

want idle && idle

# ------------------------------------------------------------------------------------------------
# The table
python3 - "$RESULTS" "$OUT" "$RUNS" "$PARTITIONS" "$PRODUCERS" "$CONSUMERS" "$IDLE_SECS" \
  "$SETTLE_SECS" "$REPLICATION" "$ROLLING_PARTITIONS" "$ROLLING_SECS" <<'PY'
import statistics, sys
results, out, runs, partitions, producers, consumers, idle_secs, settle_secs, rf = sys.argv[1:10]
rolling_partitions, rolling_secs = sys.argv[10:12]
rows = [l.rstrip("\n").split("\t") for l in open(results) if l.strip()]
notes = [r[7] for r in rows if r[0] == "note"]
def num(x):
    try: return float(x)
    except ValueError: return None
def values(kind, target, p1=None, col=5):
    return [num(r[col]) for r in rows if r[0] == kind and r[1] == target
            and (p1 is None or r[2] == p1) and len(r) > col and num(r[col]) is not None]
def med(xs): return statistics.median(xs) if xs else None
def rate(x): return "%.2f M" % (x / 1e6) if x >= 1e6 else ("%.0f k" % (x / 1e3) if x >= 1e4 else "%.0f" % x)
def spread(xs, f):
    return f(med(xs)) + (" [%s..%s]" % (f(min(xs)), f(max(xs))) if len(xs) > 1 else "")
def size_name(s): return "1 KiB" if s == "1024" else s + " B"
table, verdicts = [], []
def verdict(name, ok, figure, target):
    verdicts.append("- %s: %s, %s (target %s)" % (name, figure, "met" if ok else "NOT met", target))
def add(measure, workload, single, cluster, ratio, target):
    table.append([measure, workload, single, cluster, ratio, target])
for r in rows:
    if r[0] in ("produce", "latency") and r[7] not in ("", "verified") and not r[7].startswith("sent "):
        notes.append("%s %s B, %s run %s: %s" % (r[0], r[2], r[1], r[4], r[7]))
    if r[0] == "latency" and ("FAILED" in r[7] or "errors" in r[7]):
        notes.append("latency %s B, %s run %s: %s" % (r[2], r[1], r[4], r[7]))
    if r[0] == "latency" and r[7].startswith("sent "):
        sent = num(r[7].split()[1].split("/")[0])
        if sent is not None and num(r[3]) and sent < 0.9 * num(r[3]):
            notes.append("latency %s B, %s run %s: the producer fell behind the asked rate (%s): "
                         "the broker was slower than at the produce part's maximum" % (r[2], r[1], r[4], r[7]))

# produce
for size in sorted({r[2] for r in rows if r[0] == "produce"}, key=int):
    s, c = values("produce", "single", size), values("produce", "cluster", size)
    smb, cmb = values("produce", "single", size, 6), values("produce", "cluster", size, 6)
    cell = lambda xs, mb: (spread(xs, rate) + "/s, %.0f MB/s" % med(mb)) if xs else "failed"
    ratio = med(c) / med(s) if s and c else None
    add("produce, acks durable", "%s, %s partition(s), %s producer(s), %s consumer(s)"
        % (size_name(size), partitions, producers, consumers),
        cell(s, smb), cell(c, cmb), "%.2fx" % ratio if ratio else "", ">= 0.5x")
    if ratio is not None:
        verdict("produce %s R=%s / single" % (size_name(size), rf), ratio >= 0.5, "%.2fx" % ratio, ">= 0.5x")
    sw, cw = values("produce", "single", size, 8), values("produce", "cluster", size, 8)
    if sw and cw:
        add("storage writes per produced byte", "%s, all brokers' write_bytes (/proc/PID/io)"
            % size_name(size), spread(sw, lambda x: "%.2f B" % x), spread(cw, lambda x: "%.2f B" % x),
            "%.2fx" % (med(cw) / med(sw)), "(explains the bound: one disk)")

# latency
fs99, fs50 = values("fsync", "-"), values("fsync", "-", col=6)
if fs99:
    add("fsync (this disk)", "4 KiB append + fdatasync, 1000 per run", "p99 " + spread(fs99, lambda x: "%.2f ms" % x)
        + ", p50 %.2f ms" % med(fs50), "", "", "")
for size in sorted({r[2] for r in rows if r[0] == "latency"}, key=int):
    s, c = values("latency", "single", size), values("latency", "cluster", size)
    s50, c50 = values("latency", "single", size, 6), values("latency", "cluster", size, 6)
    rates = {t: next((r[3] for r in rows if r[0] == "latency" and r[1] == t and r[2] == size), "?")
             for t in ("single", "cluster")}
    cell = lambda xs, x50, t: ("p99 " + spread(xs, lambda x: "%.2f ms" % x) + ", p50 %.2f ms at %s/s"
                               % (med(x50), rate(float(rates[t])))) if xs else "failed"
    ratio = med(c) / med(s) if s and c else None
    bound = 2 + med(fs99) if fs99 else None
    add("latency per batch at half the max", "%s, request -> ack, --linger-ms 0" % size_name(size),
        cell(s, s50, "single"), cell(c, c50, "cluster"), "%.2fx" % ratio if ratio else "",
        "<= 2 ms + fsync p99" + (" = %.2f ms" % bound if bound else ""))
    if c and bound:
        verdict("latency p99 per batch %s R=%s at half rate" % (size_name(size), rf), med(c) <= bound,
                "%.2f ms" % med(c), "<= %.2f ms" % bound)

# failover
fo = [r for r in rows if r[0] == "failover"]
if fo:
    ms = sorted(num(r[5]) for r in fo if num(r[5]) is not None)
    failed = len(fo) - len(ms)
    for r in fo:
        notes.append("failover kill %s: %s ms (first ack past the last offset: %s ms); %s" % (r[2], r[5] or "-", r[6] or "-", r[7]))
    if ms:
        cell = "p50 %.0f ms, max %.0f ms over %d kills%s" % (med(ms), ms[-1], len(ms),
               ", %d without a new acknowledgement" % failed if failed else "")
        add("failover: kill -9 of the leader -> first ack", "1 partition, R=%s, acks durable, one record at a time" % rf,
            "n/a (one node)", cell, "", "p50 <= 1 s, max <= 3 s")
        verdict("failover p50", med(ms) <= 1000, "%.0f ms" % med(ms), "<= 1 s")
        verdict("failover max", ms[-1] <= 3000 and not failed, "%.0f ms" % ms[-1], "<= 3 s")

# idle
for phase in dict.fromkeys(r[2] for r in rows if r[0] == "idle"):
    idle = {r[1]: (num(r[5]), num(r[6])) for r in rows if r[0] == "idle" and r[2] == phase}
    nodes_seen = sorted(k for k in idle if k.startswith("node-"))
    cell = lambda k: "%.2f%%, %.0f MiB" % idle[k]
    worst = max((idle[k][0] for k in nodes_seen), default=None)
    worst_rss = max((idle[k][1] for k in nodes_seen), default=None)
    single = idle.get("single")
    ratio = ""
    if single and worst is not None:
        ratio = ("%.1fx CPU, " % (worst / single[0]) if single[0] >= 0.1 else
                 "CPU: single ~0, ") + "%.1fx RSS" % (worst_rss / single[1])
    add("idle CPU of a core, RSS", "%s, over %s s%s" % (phase, idle_secs,
        "" if phase == "fresh" else " (R=%s on the cluster), %s s after every partition had a leader" % (rf, settle_secs)),
        cell("single") if single else "n/a", "; ".join("%s %s" % (k, cell(k)) for k in nodes_seen) or "n/a",
        ratio, "<= 10% and <= 300 MiB per node")
    if worst is not None:
        verdict("idle CPU (%s), worst node" % phase, worst <= 10, "%.2f%% of a core" % worst, "<= 10%")
        verdict("idle RSS (%s), worst node" % phase, worst_rss <= 300, "%.0f MiB" % worst_rss, "<= 300 MiB")
for r in rows:
    if r[0] == "create":
        made = ("%s x %s partitions created in %s s through one client" % (r[2], r[3], r[5])
                if r[5] else "the create failed part-way (see above)")
        notes.append("idle topics on the %s: %s%s; %s" % (
            r[1], made, " (until every partition had a leader: %s s)" % r[6] if r[6] else "", r[7]))

# rolling
rl = [r for r in rows if r[0] == "rolling"]
if rl:
    def col(mode, i):
        return [num(r[i]) for r in rl if r[2] == mode and len(r) > i and num(r[i]) is not None]
    def errors(mode):
        return sum(int(num(r[10]) or 0) for r in rl if r[2] == mode and len(r) > 10)
    ms = lambda x: "%.2f ms" % x
    workload = "100 B at %s/s, %s partitions at R=%s, acks durable, %s producer(s), %s s runs" % (
        rate(float(rl[0][3])), rolling_partitions, rf, producers, rolling_secs)
    secs, back = col("rolling", 8), col("rolling", 14)
    if secs:
        add("rolling restart of 3 nodes", "SIGTERM, restart, every replica caught up, one node at a time, under the load below",
            "n/a (one node)", spread(secs, lambda x: "%.1f s" % x), "", "")
    if back:
        add("leaders back on their preferred replicas", "from the first SIGTERM of the rolling restart",
            "n/a (one node)", spread(back, lambda x: "%.1f s" % x), "", "")
    def cell(mode):
        x99 = col(mode, 5)
        if not x99:
            return "failed"
        return "per record p99 %s, max %.0f ms, p50 %.2f ms; per batch p99 %.2f ms (%d produce errors)" % (
            spread(x99, ms), med(col(mode, 9)), med(col(mode, 11)), med(col(mode, 6)), errors(mode))
    add("produce latency, steady", workload, "n/a", cell("steady"), "", "")
    s99, r99 = col("steady", 5), col("rolling", 5)
    ratio = med(r99) / med(s99) if s99 and r99 else None
    add("produce latency, rolling restart", workload + ", a restart in each run", "n/a", cell("rolling"),
        "%.1fx steady (p99 per record)" % ratio if ratio else "", "")
    if secs:
        verdict("rolling restart: produce errors", errors("rolling") == 0, "%d" % errors("rolling"),
                "0: nothing beyond the client's retries")
    for r in rl:
        if r[2] == "rolling" and len(r) > 13:
            notes.append("rolling run %s: restart %s s, leaders back after %s s; per node stop/start/catch-up s: %s; %s" % (
                r[4], r[8] or "-", (r[14] if len(r) > 14 else "") or "-", r[13] or "-", r[7]))
        else:
            notes.append("%s run %s: %s" % (r[2], r[4], r[7]))

head = ["measure", "workload", "single node (R=1)", "3-node cluster (R=%s)" % rf, "cluster / single", "target"]
widths = [max(len(str(r[i])) for r in table + [head]) for i in range(len(head))]
line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
text = [line(head), line(["-" * w for w in widths])] + [line(r) for r in table]
text += [""] + (verdicts or ["- no cluster figures: nothing to judge"])
text += ["note: " + n for n in notes]
text.append("medians of %s run(s), [min..max] where more than one; one machine: the 3 nodes and "
            "the client share its cores and disk" % runs)
print("\n".join(text))
md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
md += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in table]
md += [""] + verdicts + ["", *("Note: " + n for n in notes)]
open(out, "w").write("\n".join(md) + "\n")
print("markdown copy: %s" % out)
PY
