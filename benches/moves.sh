#!/usr/bin/env bash
# Moving a partition (issue 16): how long `syncline topic reassign` takes to move a partition of
# --size bytes to a node that joined, with the default throttle and unthrottled, and what the
# move costs a producer writing to another topic meanwhile, against the same producer without a
# move, in one run on one machine. Not part of CI (.ci/run).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: benches/moves.sh [OPTIONS]

Starts release binaries: 3 brokers forming a cluster (--cluster, a data dir each under the work
directory, loopback ports chosen up front), then:

  fill      creates topic `big` (1 partition, R=--replication-factor) and fills it with --size bytes of 1 KiB
            records (`syncline bench --topic big --records N --consumers 0 --acks leader`).
  join      starts a 4th node with --join.
  baseline  `syncline bench --json --replication-factor 3 --duration --secs --acks durable` (a
            fresh topic of 1 partition, deleted after the run so that the disk holds only the
            moved partition): records/s without a move.
  moves     --runs times, alternating: move big/0 to the 4th node in place of the partition's
            first replica with the default throttle (50 MiB/s), then back unthrottled
            (--throttle 0), each time starting the same bench at the same moment.
            Reports the move's seconds (from the CLI's own summary line) and the bench's
            records/s as a ratio to the baseline of the same run. With R=1 (a move by copy,
            `cluster/copy.rs`) also the write gap: from the old node's fence to the new node
            opening the copy (from the two nodes' logs), while writes to big/0 are refused.

Disk: about 10 x --size (4 replicas' partition and Raft logs, and the bench topics').
Everything runs on this machine's cores and one disk: the 4 brokers, the bench and the copy
share them, so the ratios show what a move costs here, not on a cluster of machines.

Options:
  --size BYTES     bytes of records in the moved partition (default 1GiB; units accepted)
  --secs S         seconds of each bench (default 10)
  --runs N         moves of each kind (default 2)
  --replication-factor R   of the moved partition (default 3; 1: moved by copy)
  --work DIR       work directory (default: a new one under /tmp, removed at the end)
  --out FILE       the results table (default: target/moves-results.md)
  -h, --help       this help
EOF
}

SIZE=1GiB
SECS=10
RUNS=2
RF=3
WORK=""
OUT=target/moves-results.md
while [ $# -gt 0 ]; do
  case $1 in
    --size) SIZE=$2; shift ;;
    --secs) SECS=$2; shift ;;
    --runs) RUNS=$2; shift ;;
    --replication-factor) RF=$2; shift ;;
    --work) WORK=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
BROKER=target/release/syncline-broker
CLI=target/release/syncline
for b in "$BROKER" "$CLI"; do
  [ -x "$b" ] || { echo "missing $b (cargo build --release first)" >&2; exit 1; }
done
KEEP_WORK=1
if [ -z "$WORK" ]; then WORK=$(mktemp -d /tmp/syncline-moves-bench.XXXXXX); KEEP_WORK=0; fi
mkdir -p "$WORK" "$(dirname "$OUT")"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ "$KEEP_WORK" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "[moves $(date +%H:%M:%S)] $*" >&2; }
busy_note() { NOTES+=("$1"); }
NOTES=()
# shellcheck source=benches/lib.sh
. benches/lib.sh

read -r -a PORTS <<< "$(free_ports 4)"
VOTERS="1=127.0.0.1:${PORTS[0]},2=127.0.0.1:${PORTS[1]},3=127.0.0.1:${PORTS[2]}"
ADDRS="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"

spawn() {
  local i=$1; shift
  mkdir -p "$WORK/node-$i"
  "$BROKER" --data-dir "$WORK/node-$i/data" --listen "127.0.0.1:${PORTS[$((i - 1))]}" \
    --advertise "127.0.0.1:${PORTS[$((i - 1))]}" --metrics-listen 127.0.0.1:0 --node-id "$i" \
    "$@" > "$WORK/node-$i/broker.log" 2>&1 &
  PIDS+=($!)
}

for i in 1 2 3; do spawn "$i" --cluster "$VOTERS"; done
for i in 1 2 3; do
  wait_listening "$WORK/node-$i/broker.log" "${PIDS[$((i - 1))]}" ||
    { tail -5 "$WORK/node-$i/broker.log" >&2; exit 1; }
done
[ -n "$(agreed_controller "$CLI" "$ADDRS")" ] || { echo "no controller" >&2; exit 1; }
log "cluster of 3 on $ADDRS"

"$CLI" --broker "$ADDRS" topic create big --partitions 1 --replication-factor "$RF" > /dev/null
BYTES=$(python3 -c '
import re, sys
m = re.fullmatch(r"(\d+)\s*(|B|KiB|MiB|GiB)", sys.argv[1])
print(int(m.group(1)) * {"": 1, "B": 1, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)])' "$SIZE")
RECORDS=$((BYTES / 1024))
log "filling big/0 with $RECORDS records of 1 KiB"
"$CLI" --broker "$ADDRS" bench --json --topic big --records "$RECORDS" --record-size 1KiB \
  --consumers 0 --acks leader > "$WORK/fill.json" 2> "$WORK/fill.err" ||
  { tail -3 "$WORK/fill.err" >&2; exit 1; }

spawn 4 --join "127.0.0.1:${PORTS[0]}"
wait_listening "$WORK/node-4/broker.log" "${PIDS[3]}" || { tail -5 "$WORK/node-4/broker.log" >&2; exit 1; }
for _ in $(seq 1 60); do
  "$CLI" --broker "$ADDRS" cluster status --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(n["id"]==4 and n["alive"] for n in d["nodes"]) else 1)' &&
    break
  sleep 1
done
log "node 4 joined"

# bench_load FILE: the bench on a fresh topic (R=3, deleted after the run, so the disk holds
# only the moved partition), records/s in FILE.json.
bench_load() {
  "$CLI" --broker "$ADDRS" bench --json --replication-factor 3 --duration "$SECS" \
    --consumers 0 --acks durable > "$1.json" 2> "$1.err" || log "bench failed: $(tail -1 "$1.err")"
}
rate_of() { python3 -c 'import json,sys; print("%.0f" % json.load(open(sys.argv[1]))["produce"]["records_per_sec"])' "$1.json" 2>/dev/null || echo 0; }
replicas_of_big() {
  "$CLI" --broker "$ADDRS" cluster status --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); p=[p for p in d["partitions"] if p["topic"]=="big"][0]; print(",".join(map(str,p["replicas"])))'
}

# write_gap HOLDER_LOG TARGET_LOG: ms from the holder's last fence of big/0 to the target
# opening its copy (both logs' timestamps, one clock).
write_gap() {
  python3 - "$1" "$2" <<'PY'
import re, sys
from datetime import datetime
def last(path, needle):
    t = None
    for line in open(path, errors="replace"):
        if needle in line and 'topic="big"' in line or needle in line and "topic=big" in line:
            t = line.split()[0]
    return datetime.fromisoformat(t.rstrip("Z")) if t else None
fenced = last(sys.argv[1], "partition fenced for the end of its move")
opened = last(sys.argv[2], "a replica of the partition moved onto this node")
print("%.0f" % ((opened - fenced).total_seconds() * 1000) if fenced and opened else "")
PY
}

RESULTS=$WORK/results.tsv
: > "$RESULTS"
for run in $(seq 1 "$RUNS"); do
  quiet; sync; sleep 1
  bench_load "$WORK/base.$run"
  base=$(rate_of "$WORK/base.$run")
  for kind in throttled unthrottled; do
    from=$(replicas_of_big)
    if [ "$RF" = 1 ]; then
      # One replica: to node 4, then back to where it was.
      if [ "$from" = 4 ]; then to=$first_home; else first_home=$from; to=4; fi
    elif [[ ",$from," == *",4,"* ]]; then
      # Node 4 holds it: back to node 1..3 missing from the set.
      missing=$(python3 -c 'import sys; r=list(map(int,sys.argv[1].split(","))); print([n for n in (1,2,3) if n not in r][0])' "$from")
      to=$(echo "$from" | sed "s/\b4\b/$missing/")
    else
      to=$(echo "$from" | sed 's/^[0-9]*/4/')
    fi
    throttle=()
    [ "$kind" = unthrottled ] && throttle=(--throttle 0)
    quiet; sync; sleep 1
    bench_load "$WORK/during.$run.$kind" &
    bench_pid=$!
    line=$("$CLI" --broker "$ADDRS" topic reassign big --partition 0 --replicas "$to" \
      "${throttle[@]}" 2> "$WORK/move.$run.$kind.err") || { tail -2 "$WORK/move.$run.$kind.err" >&2; exit 1; }
    wait "$bench_pid"
    seconds=$(echo "$line" | grep -oE 'in [0-9.]+ s' | awk '{print $2}')
    during=$(rate_of "$WORK/during.$run.$kind")
    gap=""
    if [ "$RF" = 1 ]; then
      gap=$(write_gap "$WORK/node-${from}/broker.log" "$WORK/node-${to}/broker.log")
    fi
    log "run $run $kind: $from -> $to in ${seconds} s; load $during rec/s during vs $base without${gap:+; write gap $gap ms}"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$run" "$kind" "$seconds" "$base" "$during" "$from->$to" "$gap" >> "$RESULTS"
  done
done

python3 - "$RESULTS" "$BYTES" "$SECS" > "$OUT" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
size = int(sys.argv[2]) / (1 << 30)
print("| move of %.2f GiB | run | seconds | MiB/s | load rec/s during | without | ratio | write gap ms |" % size)
print("|---|---|---|---|---|---|---|---|")
for run, kind, seconds, base, during, moved, gap in rows:
    s = float(seconds or "nan")
    print("| %s (%s) | %s | %.1f | %.0f | %s | %s | %.2fx | %s |" % (
        kind, moved, run, s, int(sys.argv[2]) / (1 << 20) / s, during, base,
        float(during) / float(base) if float(base) else float("nan"), gap or "-"))
for kind in ("throttled", "unthrottled"):
    secs = [float(r[2]) for r in rows if r[1] == kind and r[2]]
    ratios = [float(r[4]) / float(r[3]) for r in rows if r[1] == kind and float(r[3])]
    if secs:
        print("\n%s: median %.1f s, load at median %.2fx of the same run without a move" % (
            kind, statistics.median(secs), statistics.median(ratios)))
PY
for note in "${NOTES[@]}"; do echo "note: $note" >> "$OUT"; done
cat "$OUT"
