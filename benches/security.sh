#!/usr/bin/env bash
# What TLS and token authentication cost (issue 17): the same `syncline bench` against one broker
# serving plain text and one serving TLS with static-token authentication, alternating, in one
# run on one machine; records/s and p99 produce latency, as ratios of the secure broker to the
# plain one. Not part of CI (.ci/run).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: benches/security.sh [OPTIONS]

Starts two release brokers on loopback (a data dir each under the work directory): `plain`
(no TLS, no authentication) and `secure` (--tls-cert/--tls-key from a CA made here with
openssl, --auth-tokens-file with a token for `bench`, which an ACL allows create, delete, read
and write on every topic so that its calls pay the ACL check, and one for the superuser
`admin` that grants it). Then, --runs times and for each record size
(1 KiB and 100 B), `syncline bench --json --duration --secs` against plain, then against
secure (`--tls-ca --token`), after waiting for a quiet machine; and the same at a fixed rate of
--rate records/s of 1 KiB, where the latency is the transport's and not a queue's. Reports
records/s and the p99 per-record latency of each, and secure/plain ratios (the median over the
runs). Unpaced runs saturate the machine: their p99 is queueing, compare the paced one.

Options:
  --secs S     seconds of each bench (default 10)
  --runs N     runs of each pair (default 3)
  --rate R     records/s of the paced runs (default 20000)
  --work DIR   work directory (default: a new one under /tmp, removed at the end)
  --out FILE   the results table (default: target/security-results.md)
  -h, --help   this help
USAGE
}

SECS=10
RUNS=3
RATE=20000
WORK=""
OUT=target/security-results.md
while [ $# -gt 0 ]; do
  case $1 in
    --secs) SECS=$2; shift ;;
    --runs) RUNS=$2; shift ;;
    --rate) RATE=$2; shift ;;
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
command -v openssl > /dev/null || { echo "openssl is needed to make the certificates" >&2; exit 1; }
KEEP_WORK=1
if [ -z "$WORK" ]; then WORK=$(mktemp -d /tmp/syncline-security-bench.XXXXXX); KEEP_WORK=0; fi
mkdir -p "$WORK" "$(dirname "$OUT")"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ "$KEEP_WORK" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "[security $(date +%H:%M:%S)] $*" >&2; }
busy_note() { NOTES+=("$1"); }
NOTES=()
# shellcheck source=benches/lib.sh
. benches/lib.sh

# A CA and a server certificate for 127.0.0.1 (P-256, like most deployments).
TLS=$WORK/tls
mkdir -p "$TLS"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench-ca -keyout "$TLS/ca-key.pem" -out "$TLS/ca.pem" 2> /dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=broker \
  -keyout "$TLS/key.pem" -out "$TLS/req.pem" 2> /dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$TLS/ext.cnf"
openssl x509 -req -in "$TLS/req.pem" -CA "$TLS/ca.pem" -CAkey "$TLS/ca-key.pem" \
  -CAcreateserial -days 2 -extfile "$TLS/ext.cnf" -out "$TLS/cert.pem" 2> /dev/null
TOKEN=bench-token-$$
SHA=$(printf '%s' "$TOKEN" | sha256sum | awk '{print $1}')
ADMIN_TOKEN=admin-token-$$
ADMIN_SHA=$(printf '%s' "$ADMIN_TOKEN" | sha256sum | awk '{print $1}')
printf '[[token]]\nprincipal = "bench"\nsha256 = "%s"\n\n[[token]]\nprincipal = "admin"\nsha256 = "%s"\n' \
  "$SHA" "$ADMIN_SHA" > "$WORK/tokens.toml"

start() {
  local name=$1; shift
  mkdir -p "$WORK/$name"
  "$BROKER" --data-dir "$WORK/$name/data" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    "$@" > "$WORK/$name/broker.log" 2>&1 &
  PIDS+=($!)
  wait_listening "$WORK/$name/broker.log" "$!" || { tail -5 "$WORK/$name/broker.log" >&2; exit 1; }
}
start plain
start secure --tls-cert "$TLS/cert.pem" --tls-key "$TLS/key.pem" --auth-tokens-file "$WORK/tokens.toml" \
  --superusers admin
PLAIN=$(listen_addr "$WORK/plain/broker.log")
SECURE=$(listen_addr "$WORK/secure/broker.log")
# `bench` is no superuser: its calls go through the ACL check, as a service's would.
"$CLI" --broker "$SECURE" --tls-ca "$TLS/ca.pem" --token "$ADMIN_TOKEN" acl add --principal bench \
  --allow create,delete,read,write --topic-prefix '' > /dev/null
log "plain on $PLAIN, TLS + token on $SECURE"

RESULTS=$WORK/results.tsv
: > "$RESULTS"
for run in $(seq 1 "$RUNS"); do
  for case in 1KiB 100B "1KiB@$RATE"; do
    size=${case%@*}
    pace=()
    [[ $case == *@* ]] && pace=(--rate "${case#*@}")
    for side in plain secure; do
      quiet; sync; sleep 1
      if [ "$side" = plain ]; then
        flags=(--broker "$PLAIN")
      else
        flags=(--broker "$SECURE" --tls-ca "$TLS/ca.pem" --token "$TOKEN")
      fi
      out=$WORK/$side.$case.$run.json
      "$CLI" "${flags[@]}" bench --json --duration "$SECS" --record-size "$size" "${pace[@]}" \
        > "$out" 2> "$out.err" || { log "bench failed: $(tail -1 "$out.err")"; continue; }
      read -r rate p99 < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))["produce"]
print("%.0f %.3f" % (d["records_per_sec"], d["latency_ms"]["p99"]))' "$out")
      log "run $run $case $side: $rate rec/s, p99 $p99 ms"
      printf '%s\t%s\t%s\t%s\t%s\n' "$run" "$case" "$side" "$rate" "$p99" >> "$RESULTS"
    done
  done
done

python3 - "$RESULTS" "$SECS" > "$OUT" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("| record size | run | plain rec/s | TLS + token rec/s | ratio | plain p99 ms | TLS + token p99 ms | added p99 ms |")
print("|---|---|---|---|---|---|---|---|")
summary = {}
for size in sorted({r[1] for r in rows}, key=lambda c: ("@" in c, c)):
    for run in sorted({r[0] for r in rows}, key=int):
        got = {r[2]: r for r in rows if r[0] == run and r[1] == size}
        if "plain" not in got or "secure" not in got:
            continue
        pr, pp = float(got["plain"][3]), float(got["plain"][4])
        sr, sp = float(got["secure"][3]), float(got["secure"][4])
        summary.setdefault(size, []).append((sr / pr if pr else float("nan"), sp - pp))
        print("| %s | %s | %.0f | %.0f | %.2fx | %.3f | %.3f | %+.3f |" % (size, run, pr, sr, sr / pr if pr else float("nan"), pp, sp, sp - pp))
for size, values in summary.items():
    print("\n%s: TLS + token at %.2fx of plain text (median of %d runs), p99 %+.3f ms" % (
        size, statistics.median(v[0] for v in values), len(values), statistics.median(v[1] for v in values)))
PY
for note in "${NOTES[@]}"; do echo "note: $note" >> "$OUT"; done
cat "$OUT"
