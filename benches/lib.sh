# Shell helpers shared by the benchmark scripts (benches/compare.sh, benches/cluster.sh,
# benches/replication.sh), sourced after the script defines `log MESSAGE` (progress on stderr)
# and `busy_note TEXT` (records in its results that a run started on a busy machine).

# The machine has 2 cores shared by client and server: before each run, wait (up to 2 min) until
# the CPUs were less than 40% busy (of all cores) over the last 2 s. The load average would count
# our own previous run for a minute; /proc/stat between runs sees only the others.
quiet() {
  local busy
  for _ in $(seq 1 24); do
    busy=$(python3 -c '
import time
def snap():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v), v[3] + v[4]
t0, i0 = snap(); time.sleep(2); t1, i1 = snap()
print(round(100 * (1 - (i1 - i0) / max(t1 - t0, 1))))')
    [ "$busy" -le 40 ] && return 0
    log "CPUs ${busy}% busy before a run (something else is running): waiting 5 s"
    sleep 5
  done
  log "CPUs still ${busy}% busy: measuring anyway (noted in the results)"
  busy_note "CPUs ${busy}% busy by others at the start of a run"
}

# wait_listening LOG PID: until LOG has the broker's `listening on` line (0), or PID exited or
# 30 s passed (1).
wait_listening() {
  for _ in $(seq 1 300); do
    grep -v 'metrics listening' "$1" 2>/dev/null | grep -q 'listening on' && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# listen_addr LOG: the HOST:PORT of the broker's `listening on` line.
listen_addr() {
  grep -v 'metrics listening' "$1" | grep -oE 'listening on [0-9.]+:[0-9]+' | head -1 |
    awk '{print $3}'
}

# free_ports N: N loopback ports, space-separated, bound together on 127.0.0.1:0 and released,
# so a cluster's nodes can all be given the whole voter list up front.
free_ports() {
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# agreed_controller CLI ADDRS: the controller every node of ADDRS (comma-separated) names in
# `CLI cluster status --json`, once they all name the same one; empty after 60 s.
agreed_controller() {
  local cli=$1 addrs=$2 addr seen all
  for _ in $(seq 1 120); do
    all=""
    for addr in ${addrs//,/ }; do
      seen=$("$cli" --broker "$addr" cluster status --json 2>/dev/null |
        python3 -c 'import json,sys; c=json.load(sys.stdin).get("controller"); print("" if c is None else c)' \
        2>/dev/null || true)
      [ -n "$seen" ] || { all=""; break; }
      if [ -z "$all" ]; then all=$seen; elif [ "$all" != "$seen" ]; then all=""; break; fi
    done
    [ -n "$all" ] && { echo "$all"; return 0; }
    sleep 0.5
  done
}

# cpu_rss SECS LABELS PIDS: CPU (utime+stime from /proc/PID/stat, % of one core) and RSS (MiB,
# VmRSS at the end) of each process over SECS seconds, sampled together; one line per process:
# LABEL<TAB>%CORE<TAB>RSS_MIB<TAB>ELAPSED_S. LABELS and PIDS are space-separated, in the same
# order.
cpu_rss() {
  python3 - "$1" "$2" "$3" <<'PY'
import os, sys, time
secs, labels, pids = float(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid):  # utime + stime in ticks: fields 14 and 15, counted after the ")" ending comm
    rest = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])
def rss(pid):
    for line in open("/proc/%s/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
start = {p: cpu(p) for p in pids}; t0 = time.monotonic()
time.sleep(secs)
elapsed = time.monotonic() - t0
for label, p in zip(labels, pids):
    share = 100 * (cpu(p) - start[p]) / tick / elapsed
    print("%s\t%.2f\t%.1f\t%.1f" % (label, share, rss(p), elapsed))
PY
}
