#!/usr/bin/env bash
# A single broker next to a cluster of broker processes on loopback (issue 14), in one run on one
# machine: aggregate produce rate, time to create many topics, idle CPU per node. The processes
# share this machine's cores, so the ratios measure the cluster's overhead (routing, the
# controller), not how it scales over machines. Not part of CI (.ci/run).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: benches/cluster.sh [OPTIONS]

Starts one single-node broker (no --cluster, as the README starts it) and one cluster of --nodes
broker processes on 127.0.0.1 (--node-id I, --cluster 1=127.0.0.1:P1,2=..., --advertise, ports
chosen up front), both kept running for the whole run, then measures:
  idle     CPU of every broker process (utime+stime from /proc/PID/stat, % of one core) and its
           RSS over --idle-secs, once fresh (after the controller is agreed) and once holding the
           --topics topics of the creation part
  produce  `syncline bench --json`, --producers producers, --consumers consumers (0: produce
           only), a fresh topic of 6 partitions, 100 B and 1 KiB records x each --acks level,
           for --secs each; the cluster is given the comma-separated list of its nodes
  create   --topics topics of 8 partitions, one after the other, timed: through one client
           connection (the create_topics example in benches/; the ratio is judged on this), and
           with one `syncline topic create` process per topic (shown beside it); deleted
           (untimed) after each run, but the last run's client-made topics are kept
Runs alternate single/cluster (odd runs single first, even runs cluster first); the table shows
medians and [min..max] of --runs runs, and each cluster / single ratio next to the issue's target.

If the cluster does not start (a broker that refuses a --cluster naming other nodes, before the
controller exists) or agrees on no controller within 60 s, the single-node half still runs and
the cluster columns say why they are empty.

Options:
  --runs N            runs per measurement, medians shown (default 3)
  --secs S            seconds per produce run (default 6)
  --idle-secs S       seconds per idle CPU sample (default 20)
  --nodes N           cluster size (default 3)
  --acks LIST         comma-separated acks levels for produce: leader,durable (default both)
  --producers N       bench producers (default 2)
  --consumers N       bench consumers (default 0)
  --topics N          topics created per creation run (default 100)
  --quick             1 run, 2 s per produce run, 5 s idle samples (a smoke test)
  --no-build          use the binaries already in $CARGO_TARGET_DIR/release
  --out FILE          markdown copy of the table (default: $CARGO_TARGET_DIR/cluster-results.md)
  -h, --help          this help

Environment: CARGO_TARGET_DIR (default ./target); KEEP_WORK=1 keeps the work directory (broker
logs and data, raw outputs) instead of deleting it. Needs python3.
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
RUNS=3
SECS=6
IDLE_SECS=20
NODES=3
ACKS=leader,durable
PRODUCERS=2
CONSUMERS=0
TOPICS=100
TOPIC_PARTITIONS=8
BENCH_PARTITIONS=6
BUILD=1
OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift ;;
    --secs) SECS=$2; shift ;;
    --idle-secs) IDLE_SECS=$2; shift ;;
    --nodes) NODES=$2; shift ;;
    --acks) ACKS=$2; shift ;;
    --producers) PRODUCERS=$2; shift ;;
    --consumers) CONSUMERS=$2; shift ;;
    --topics) TOPICS=$2; shift ;;
    --quick) RUNS=1; SECS=2; IDLE_SECS=5 ;;
    --no-build) BUILD=0 ;;
    --out) OUT=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$TARGET/cluster-results.md}

WORK=$(mktemp -d /tmp/syncline-cluster-bench.XXXXXX)
RESULTS=$WORK/results.tsv
: > "$RESULTS"
SINGLE_PID=""
SINGLE_ADDR=""
CLUSTER_PIDS=()
CLUSTER_ADDRS=""      # comma-separated, node 1 first; empty when the cluster is not running
CLUSTER_REASON=""     # why the cluster is not running

cleanup() {
  local pid
  for pid in $SINGLE_PID "${CLUSTER_PIDS[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[cluster $(date +%H:%M:%S)] $*" >&2; }

# One result row: kind target param1 param2 run value1 value2 note
#   produce TARGET SIZE ACKS RUN records/s MB/s note
#   create  TARGET TOPICS PARTITIONS RUN seconds ms-per-topic note
#   create-cli (the same, through one CLI process per topic)
#   idle    TARGET(single|node-I) PHASE - 1 %core RSS-MiB note
#   note    - - - - - - text
row() { local IFS=$'\t'; echo "$*" >> "$RESULTS"; }

# quiet: wait for the other load on this machine to pass (benches/lib.sh).
busy_note() { row note - - - - - - "$1"; }
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

# ------------------------------------------------------------------------------------------------
# Build
if [ "$BUILD" = 1 ]; then
  log "building release binaries into $TARGET"
  (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release --locked -q --workspace --bins &&
    CARGO_TARGET_DIR=$TARGET cargo build --release --locked -q --example create_topics)
fi
BROKER=$TARGET/release/syncline-broker
CLI=$TARGET/release/syncline
CREATE=$TARGET/release/examples/create_topics
for b in "$BROKER" "$CLI" "$CREATE"; do [ -x "$b" ] || { echo "missing $b (build first)" >&2; exit 1; }; done

# ------------------------------------------------------------------------------------------------
# Brokers

start_single() {
  local dir=$WORK/single
  mkdir -p "$dir"
  "$BROKER" --data-dir "$dir/data" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    > "$dir/broker.log" 2>&1 &
  SINGLE_PID=$!
  wait_listening "$dir/broker.log" "$SINGLE_PID" ||
    { cat "$dir/broker.log" >&2; echo "the single broker did not start" >&2; exit 1; }
  SINGLE_ADDR=$(listen_addr "$dir/broker.log")
  log "single broker pid $SINGLE_PID on $SINGLE_ADDR"
}

stop_cluster() {
  local pid
  for pid in "${CLUSTER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${CLUSTER_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  CLUSTER_PIDS=()
  CLUSTER_ADDRS=""
}

# Ports chosen up front (bound together on 127.0.0.1:0, then released): every node is given
# the whole voter list. Sets CLUSTER_PIDS and CLUSTER_ADDRS, or CLUSTER_REASON.
start_cluster() {
  local ports voters="" addrs="" i dir controller
  read -r -a ports <<< "$(free_ports "$NODES")"
  for i in $(seq 1 "$NODES"); do
    voters=$voters${voters:+,}$i=127.0.0.1:${ports[$((i - 1))]}
    addrs=$addrs${addrs:+,}127.0.0.1:${ports[$((i - 1))]}
  done
  # Spawn every node before waiting for any: a node may wait for its peers before it serves.
  for i in $(seq 1 "$NODES"); do
    dir=$WORK/node-$i
    mkdir -p "$dir"
    "$BROKER" --data-dir "$dir/data" --listen "127.0.0.1:${ports[$((i - 1))]}" \
      --advertise "127.0.0.1:${ports[$((i - 1))]}" --metrics-listen 127.0.0.1:0 \
      --node-id "$i" --cluster "$voters" > "$dir/broker.log" 2>&1 &
    CLUSTER_PIDS+=($!)
  done
  for i in $(seq 1 "$NODES"); do
    if ! wait_listening "$WORK/node-$i/broker.log" "${CLUSTER_PIDS[$((i - 1))]}"; then
      CLUSTER_REASON="node $i did not start: $(grep -m1 -i 'error' "$WORK/node-$i/broker.log" ||
        tail -1 "$WORK/node-$i/broker.log")"
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
  log "cluster of $NODES: pids ${CLUSTER_PIDS[*]} on $CLUSTER_ADDRS, controller node $controller"
}

# check_alive: a broker process that is gone (crashed, or ended from outside the script) ends the
# run when it is the single node, and the cluster half (noted) when it is a cluster node.
check_alive() {
  local i
  if ! kill -0 "$SINGLE_PID" 2>/dev/null; then
    log "the single broker (pid $SINGLE_PID) is gone; its log ends:"
    tail -3 "$WORK/single/broker.log" >&2
    exit 1
  fi
  for i in $(seq 1 "${#CLUSTER_PIDS[@]}"); do
    if ! kill -0 "${CLUSTER_PIDS[$((i - 1))]}" 2>/dev/null; then
      CLUSTER_REASON="node $i (pid ${CLUSTER_PIDS[$((i - 1))]}) is gone mid-run; its log ends: $(tail -1 "$WORK/node-$i/broker.log")"
      log "cluster half stopped: $CLUSTER_REASON"
      row note - - - - - - "cluster half stopped: $CLUSTER_REASON"
      stop_cluster
      return 0
    fi
  done
}

# targets: the running systems, in run order for run $1 (odd: single first, even: cluster first)
targets() {
  if [ -z "$CLUSTER_ADDRS" ]; then echo single
  elif [ $(($1 % 2)) = 1 ]; then echo single cluster
  else echo cluster single
  fi
}
address_of() { if [ "$1" = single ]; then echo "$SINGLE_ADDR"; else echo "$CLUSTER_ADDRS"; fi; }

# ------------------------------------------------------------------------------------------------
# Measurements

# idle PHASE: CPU (% of one core) and RSS of every broker process over IDLE_SECS.
idle() {
  local labels=single pids=$SINGLE_PID i
  sleep 5   # let the previous step's background work (deletes, flushes) settle
  check_alive
  for i in $(seq 1 "${#CLUSTER_PIDS[@]}"); do
    labels="$labels node-$i"
    pids="$pids ${CLUSTER_PIDS[$((i - 1))]}"
  done
  log "idle CPU ($1): $labels over ${IDLE_SECS} s"
  cpu_rss "$IDLE_SECS" "$labels" "$pids" | while IFS=$'\t' read -r label share rss elapsed; do
    row idle "$label" "$1" - 1 "$share" "$rss" "$elapsed s"
  done
}

# produce TARGET SIZE ACKS RUN: one `syncline bench` run.
produce() {
  local target=$1 size=$2 acks=$3 run=$4
  local f=$WORK/produce.$target.$size.$acks.$run
  check_alive
  [ "$target" = cluster ] && [ -z "$CLUSTER_ADDRS" ] && return 0
  quiet
  sync; sleep 1   # earlier runs' dirty pages are not written back during this one
  if ! "$CLI" --broker "$(address_of "$target")" bench --json --producers "$PRODUCERS" \
      --consumers "$CONSUMERS" --partitions "$BENCH_PARTITIONS" --record-size "$size" \
      --duration "$SECS" --acks "$acks" > "$f.json" 2> "$f.err"; then
    log "bench $target $size B acks $acks run $run failed: $(tail -1 "$f.err")"
  fi
  python3 - "$f.json" "$target" "$size" "$acks" "$run" >> "$RESULTS" <<'PY'
import json, sys
f, target, size, acks, run = sys.argv[1:6]
try:
    d = json.load(open(f))
except Exception:
    print("\t".join(["produce", target, size, acks, run, "", "", "failed"])); sys.exit()
p, v = d["produce"], d.get("verify", {})
bad = sum(v.get(k, 0) for k in ("lost", "duplicated", "reordered", "corrupt", "produce_errors"))
note = ("VERIFY FAILED" if bad else "verified") if v.get("checked") else (
    "%d produce errors" % v["produce_errors"] if v.get("produce_errors") else "")
print("\t".join(["produce", target, size, acks, run, "%.0f" % p["records_per_sec"],
                 "%.1f" % p["mb_per_sec"], note]))
PY
}

# create TARGET RUN KEEP: TOPICS topics of TOPIC_PARTITIONS partitions, created one after the
# other, timed, twice: through one client connection (benches/create_topics.rs: the broker's or
# the cluster's time; kept when KEEP is 1, else deleted untimed), and as a user would, one
# `syncline topic create` process per topic (always deleted). Measured here (2 cores, busy): a
# CLI process costs 3-5 ms (start, connect, one call: 50 x `topic list`) against 5-20 ms per
# create of 8 partitions on a single node (10.8 ms/topic through the CLI, 6.4 through one
# client, same run): up to 40% of the single node's CLI figure, a constant that would pull the
# cluster/single ratio towards 1. So the ratio is judged on the client loop; the CLI loop is
# shown beside it as what a user sees.
create() {
  local target=$1 run=$2 keep=$3 addr i t0 t1 failed=0 made f=$WORK/create.$1.$2
  check_alive
  [ "$target" = cluster ] && [ -z "$CLUSTER_ADDRS" ] && return 0
  addr=$(address_of "$target")
  quiet
  if ! "$CREATE" --broker "$addr" --topics "$TOPICS" --partitions "$TOPIC_PARTITIONS" \
      --prefix "bench-r$run" $([ "$keep" = 1 ] && echo --keep) > "$f.json" 2> "$f.err"; then
    log "create_topics $target run $run failed: $(tail -1 "$f.err")"
  fi
  python3 - "$f.json" "$target" "$run" >> "$RESULTS" <<'PY'
import json, sys
f, target, run = sys.argv[1:4]
try:
    d = json.load(open(f))
except Exception:
    print("\t".join(["create", target, "", "", run, "", "", "failed"])); sys.exit()
print("\t".join(["create", target, str(d["topics"]), str(d["partitions"]), run, "%.3f" % d["secs"],
                 "%.1f" % d["ms_per_topic"], "p50 %.1f ms, p99 %.1f ms" % (d["p50_ms"], d["p99_ms"])]))
PY
  quiet
  t0=$(date +%s.%N)
  for i in $(seq 1 "$TOPICS"); do
    "$CLI" --broker "$addr" topic create "bench-cli-r$run-$i" --partitions "$TOPIC_PARTITIONS" \
      > /dev/null 2>> "$f.cli.err" || failed=$((failed + 1))
  done
  t1=$(date +%s.%N)
  made=$("$CLI" --broker "$addr" topic list | grep -c "^bench-cli-r$run-" || true)
  row create-cli "$target" "$TOPICS" "$TOPIC_PARTITIONS" "$run" \
    "$(python3 -c "print('%.3f' % ($t1 - $t0))")" \
    "$(python3 -c "print('%.1f' % (($t1 - $t0) * 1e3 / $TOPICS))")" \
    "$([ "$failed" = 0 ] && [ "$made" = "$TOPICS" ] || echo "$failed failed, $made listed")"
  for i in $(seq 1 "$TOPICS"); do
    "$CLI" --broker "$addr" topic delete "bench-cli-r$run-$i" > /dev/null 2>&1 || true
  done
}

# ------------------------------------------------------------------------------------------------
# The run
start_single
if ! start_cluster; then
  log "cluster half skipped: $CLUSTER_REASON"
  row note - - - - - - "cluster half skipped: $CLUSTER_REASON"
fi

idle fresh

IFS=, read -r -a ACKS_LIST <<< "$ACKS"
for size in 100 1024; do
  for acks in "${ACKS_LIST[@]}"; do
    log "produce ${size} B, acks $acks, $BENCH_PARTITIONS partitions ($RUNS x ${SECS} s each)"
    for run in $(seq 1 "$RUNS"); do
      for target in $(targets "$run"); do produce "$target" "$size" "$acks" "$run"; done
    done
  done
done

log "create $TOPICS topics of $TOPIC_PARTITIONS partitions ($RUNS runs)"
for run in $(seq 1 "$RUNS"); do
  for target in $(targets "$run"); do create "$target" "$run" "$([ "$run" = "$RUNS" ] && echo 1 || echo 0)"; done
done

idle "holding $TOPICS topics x $TOPIC_PARTITIONS"

# ------------------------------------------------------------------------------------------------
# The table
python3 - "$RESULTS" "$OUT" "$NODES" "$RUNS" "$PRODUCERS" "$CONSUMERS" "$BENCH_PARTITIONS" \
  "$IDLE_SECS" <<'PY'
import statistics, sys
results, out, nodes, runs, producers, consumers, bench_partitions, idle_secs = sys.argv[1:9]
rows = [l.rstrip("\n").split("\t") for l in open(results) if l.strip()]
notes = [r[7] for r in rows if r[0] == "note"]
def num(x):
    try: return float(x)
    except ValueError: return None
def values(kind, target, p1, p2=None, col=5):
    return [num(r[col]) for r in rows if r[0] == kind and r[1] == target and r[2] == p1
            and (p2 is None or r[3] == p2) and num(r[col]) is not None]
def med(xs): return statistics.median(xs) if xs else None
def rate(x): return "%.2f M" % (x / 1e6) if x >= 1e6 else ("%.0f k" % (x / 1e3) if x >= 1e4 else "%.0f" % x)
def spread(xs, f):
    return f(med(xs)) + (" [%s..%s]" % (f(min(xs)), f(max(xs))) if len(xs) > 1 else "")
cluster_on = any(r[1] == "cluster" for r in rows)
cluster_name = "%s-node cluster" % nodes
table, verdicts = [], []
def add(measure, workload, single, cluster, ratio, target):
    table.append([measure, workload, single, cluster if cluster_on else "n/a", ratio, target])
def judge(name, ratio, ok, target):
    if ratio is not None:
        verdicts.append("- %s: %.2fx, %s (target %s)" % (name, ratio, "met" if ok else "NOT met", target))
sizes = sorted({r[2] for r in rows if r[0] == "produce"}, key=int)
acks_levels = sorted({r[3] for r in rows if r[0] == "produce"})
for size in sizes:
    for acks in acks_levels:
        s, c = values("produce", "single", size, acks), values("produce", "cluster", size, acks)
        smb, cmb = values("produce", "single", size, acks, 6), values("produce", "cluster", size, acks, 6)
        cell = lambda xs, mb: (spread(xs, rate) + "/s, %.0f MB/s" % med(mb)) if xs else "failed"
        for r in rows:
            if r[0] == "produce" and r[2] == size and r[3] == acks and r[7] not in ("", "verified"):
                notes.append("produce %s B acks %s, %s run %s: %s" % (size, acks, r[1], r[4], r[7]))
        ratio = med(c) / med(s) if s and c else None
        add("produce (aggregate)", "%s B, acks %s, %s partitions, %s producers, %s consumers"
            % (size, acks, bench_partitions, producers, consumers),
            cell(s, smb), cell(c, cmb), "%.2fx" % ratio if ratio else "", ">= 0.8x")
        judge("produce %s B acks %s" % (size, acks), ratio, ratio is not None and ratio >= 0.8, ">= 0.8x")
for kind, how, judged in (("create", "one client, `CreateTopic` x %s", True),
                          ("create-cli", "`syncline topic create` x %s, a process each", False)):
    for p1 in sorted({r[2] for r in rows if r[0] == kind and r[2]}):
        p2 = next(r[3] for r in rows if r[0] == kind and r[2] == p1)
        s, c = values(kind, "single", p1), values(kind, "cluster", p1)
        sms, cms = values(kind, "single", p1, col=6), values(kind, "cluster", p1, col=6)
        cell = lambda xs, ms: (spread(xs, lambda x: "%.2f s" % x) + " (%.1f ms/topic)" % med(ms)) if xs else "failed"
        ratio = med(c) / med(s) if s and c else None
        add("create %s topics of %s partitions" % (p1, p2), how % p1, cell(s, sms), cell(c, cms),
            "%.2fx" % ratio if ratio else "", "<= 2x" if judged else "(includes the CLI start)")
        if judged:
            judge("create %s topics of %s partitions" % (p1, p2), ratio,
                  ratio is not None and ratio <= 2.0, "<= 2x")
for phase in [r[2] for r in rows if r[0] == "idle" and r[1] == "single"]:
    idle = {r[1]: (num(r[5]), num(r[6])) for r in rows if r[0] == "idle" and r[2] == phase}
    nodes_seen = sorted(k for k in idle if k.startswith("node-"))
    cell = lambda k: "%.2f%% (%.0f MiB)" % idle[k]
    worst = max((idle[k][0] for k in nodes_seen), default=None)
    add("idle CPU of a core (RSS)", "%s, over %s s" % (phase, idle_secs),
        cell("single"), ", ".join("%s %s" % (k, cell(k)) for k in nodes_seen) or "n/a",
        "", "< 2% per node")
    if worst is not None:
        verdicts.append("- idle CPU (%s): worst node %.2f%% of a core, %s (target < 2%%)"
                        % (phase, worst, "met" if worst < 2 else "NOT met"))
head = ["measure", "workload", "single node", cluster_name, "cluster / single", "target"]
widths = [max(len(str(r[i])) for r in table + [head]) for i in range(len(head))]
line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
text = [line(head), line(["-" * w for w in widths])] + [line(r) for r in table]
text += [""] + (verdicts or ["- no cluster figures: nothing to compare"])
text += ["note: " + n for n in notes]
text.append("medians of %s run(s), [min..max] where more than one; one machine, all processes "
            "on its cores: overhead, not scale" % runs)
print("\n".join(text))
md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
md += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in table]
md += [""] + verdicts + ["", *("Note: " + n for n in notes)]
open(out, "w").write("\n".join(md) + "\n")
print("markdown copy: %s" % out)
PY
