# Shell helpers shared by the benchmark scripts (benches/compare.sh, benches/cluster.sh), sourced
# after the script defines `log MESSAGE` (progress on stderr) and `busy_note TEXT` (records in
# its results that a run started on a busy machine).

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
