#!/usr/bin/env bash
# Profile falcon-svc's gunicorn workers with py-spy while a load runs: `make profile`.
#
# Finds the workers (the children of each gunicorn master), starts a bounded load on
# this machine, and after WARMUP seconds samples every worker for DURATION seconds
# with `py-spy record --rate RATE`: collapsed stacks (`--format raw`, what
# top_frames.py reads) and a flame graph (`--format flamegraph`, SVG) per worker.
# The files come back to OUT with profile.md: the run's parameters, the load's
# output and top_frames.py's tables (top frames, time per layer).
#
# Usage: profile_workers.sh [LOAD COMMAND...]
#   The load runs here, stopped by `timeout` at WARMUP + DURATION + 30 s. Without
#   arguments: LOAD_CMD (a shell command), else wrk -t1 -c8 with unique texts against
#   URL for WARMUP + DURATION + 5 s.
# Env:
#   SSH          how to run a command on the service's host, given one argument (a
#                shell command), e.g. SSH="ssh -i KEY -p 2222 root@127.0.0.1" for the
#                e2e host; py-spy is copied there with `cat` into a temporary
#                directory and removed afterwards. Empty (default): this machine.
#   MASTER_PIDS  gunicorn master pids (space-separated); default: the MainPID of each
#                running falcon-worker@*.service on the host.
#   DURATION     seconds of sampling per worker (default 10); RATE samples/s (200);
#   WARMUP       seconds of load before sampling (2);
#   OUT          where the files go (default var/profile/<UTC time>);
#   BLOCKING=1   pause each worker for each sample (no torn stacks), for the raw
#                recording only: two blocking samplers of one process fail each other's
#                samples. NOTE: it also skews what counts as busy: every pause interrupts
#                the threads' waits, and a thread restarting its wait is running ("R"),
#                so idle threads show up (measured here: 93% of a worker's samples in
#                Condition.wait with BLOCKING=1, 4% without). Default: --nonblocking for
#                both; a stack read while it changes is mostly dropped as an error,
#                rarely kept torn (profile.md shows the samples and errors per file).
#   FLAMEGRAPH=0 no SVG: one sampler per worker instead of two (half py-spy's CPU).
#                NOTE: py-spy's CPU comes out of the same cores (profile.md gives it).
#                Measured here (2 cores, 2 workers, wrk -c8, 7 s): 5.9 s of CPU for two
#                samplers per worker at 200/s, 3.4 s for one at 200/s, 1.6 s for one at
#                100/s, mostly system time (reading the workers' memory and /proc).
#                For the least disturbed profile: RATE=100 FLAMEGRAPH=0.
#   PY_SPY_OPTIONS  more `py-spy record` options for both recordings, e.g. "--idle
#                --threads" (every thread's every sample, wall-clock time: see below).
#   PY_SPY       py-spy on this machine (default .venv/bin/py-spy: `make venv` installs it
#                from requirements-profile.lock).
# py-spy reads the workers' memory: root on the host (or CAP_SYS_PTRACE).
#
# What the percentages are (top_frames.py): shares of the samples in which a thread was
# running or runnable ("R" in /proc: py-spy leaves idle threads out unless --idle).
# Under a load that keeps the workers busy that is their CPU time plus any wait for a
# core; profile.md also gives the workers' CPU seconds (/proc utime+stime) for the
# same window. With few connections one worker may get all of them: profile each
# worker under a load with at least as many connections as workers.
set -euo pipefail
cd "$(dirname "$0")/../../.."

duration=${DURATION:-10}
rate=${RATE:-200}
warmup=${WARMUP:-2}
out=${OUT:-var/profile/$(date -u +%Y%m%dT%H%M%SZ)}
py_spy=${PY_SPY:-.venv/bin/py-spy}
python=${PYTHON:-.venv/bin/python}
ssh_cmd=${SSH:-}

die() { echo "profile_workers: $*" >&2; exit 2; }

[[ $duration =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a whole number of seconds > 0, got '$duration'"
[[ $rate =~ ^[1-9][0-9]*$ ]] || die "RATE must be a whole number of samples per second > 0, got '$rate'"
[[ $warmup =~ ^[0-9]+$ ]] || die "WARMUP must be a whole number of seconds, got '$warmup'"
[ -x "$py_spy" ] || die "py-spy not found at $py_spy: \`make venv\` installs it into .venv (requirements-profile.lock), or set PY_SPY"

# The load: the arguments, else LOAD_CMD, else wrk against URL.
# py-spy takes about a second to attach and read the worker's symbols: the load
# outlasts the sampling by a few seconds.
load_seconds=$((warmup + duration + 5))
if [ $# -gt 0 ]; then
  load=("$@")
elif [ -n "${LOAD_CMD:-}" ]; then
  load=(bash -c "$LOAD_CMD")
elif [ -n "${URL:-}" ]; then
  load=(wrk -t1 -c8 -d"${load_seconds}s" -s scripts/bench/unique_texts.lua "$URL")
else
  die "no load: give a command, LOAD_CMD, or URL (wrk -t1 -c8 unique texts for ${load_seconds}s)"
fi

# How to run one shell command on the service's host (stdin passes through).
if [ -n "$ssh_cmd" ]; then
  read -r -a host <<<"$ssh_cmd"
else
  host=(bash -c)
fi
on_host() { "${host[@]}" "$1"; }

load_pid=""
host_dir=""
cleanup() {
  if [ -n "$load_pid" ] && kill -0 "$load_pid" 2>/dev/null; then kill -TERM "$load_pid" 2>/dev/null || true; fi
  if [ -n "$host_dir" ]; then on_host "rm -rf '$host_dir'" || true; fi
}
trap cleanup EXIT

# A worker is a child of a gunicorn master: "LABEL PID" per line. Under systemd the
# label is the unit's instance (falcon-worker@1.service -> worker1-PID).
find_workers='
masters="${MASTER_PIDS:-}"
if [ -n "$masters" ]; then
  for master in $masters; do echo "master$master $master"; done
else
  for unit in $(systemctl list-units --plain --no-legend --state=running "falcon-worker@*.service" | cut -d" " -f1); do
    main=$(systemctl show -p MainPID --value "$unit")
    [ "$main" != 0 ] && echo "$(echo "$unit" | sed "s/^falcon-worker@\(.*\)\.service$/worker\1/") $main"
  done
fi | while read -r label master; do
  for pid in $(pgrep -P "$master"); do echo "$label-$pid $pid"; done
done'
# NOTE: MASTER_PIDS goes into a shell command on the host (over SSH): digits and spaces only.
[[ ${MASTER_PIDS:-} =~ ^[0-9\ ]*$ ]] || die "MASTER_PIDS must be process ids separated by spaces: ${MASTER_PIDS:-}"
workers=$(on_host "MASTER_PIDS='${MASTER_PIDS:-}'; $find_workers")
[ -n "$workers" ] || die "no gunicorn workers found (MASTER_PIDS='${MASTER_PIDS:-}', else running falcon-worker@*.service)"
echo "workers: $(echo "$workers" | cut -d' ' -f1 | tr '\n' ' ')" >&2

# Where py-spy writes on the host; locally the venv's py-spy, remotely a copy.
host_dir=$(on_host 'mktemp -d /tmp/falcon-profile.XXXXXX')
if [ -n "$ssh_cmd" ]; then
  on_host "cat >'$host_dir/py-spy' && chmod 0755 '$host_dir/py-spy'" <"$py_spy"
  host_spy=$host_dir/py-spy
else
  host_spy=$(realpath "$py_spy")
fi

raw_mode=--nonblocking
[ "${BLOCKING:-0}" = 1 ] && raw_mode=""
common="--rate $rate --duration $duration ${PY_SPY_OPTIONS:-}"
sample="cd '$host_dir' && failed=0 && pids=''"
while read -r label pid; do
  sample+="; '$host_spy' record --pid $pid $common --format raw $raw_mode -o $label.txt >$label.txt.log 2>&1 & pids=\"\$pids \$!\""
  if [ "${FLAMEGRAPH:-1}" = 1 ]; then
    sample+="; '$host_spy' record --pid $pid $common --format flamegraph --nonblocking -o $label.svg >$label.svg.log 2>&1 & pids=\"\$pids \$!\""
  fi
done <<<"$workers"
# `times`: the CPU the samplers took (its second line: the children's user and system
# time), which they took from the host's cores while the workers ran.
sample+="; for p in \$pids; do wait \$p || failed=1; done; times >py-spy.times; tail -n 1 py-spy.times >py-spy.cpu"
sample+="; rm -f py-spy.times; exit \$failed"

mkdir -p "$out"
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "load: ${load[*]}" >&2
timeout --kill-after=5 $((warmup + duration + 30)) "${load[@]}" >"$out/load.out" 2>&1 &
load_pid=$!
sleep "$warmup"
kill -0 "$load_pid" 2>/dev/null || die "the load ended within WARMUP=${warmup}s: $(tail -n 5 "$out/load.out")"
echo "sampling $(echo "$workers" | wc -l) worker(s) for ${duration}s at ${rate}/s" >&2
# The workers' CPU time (utime + stime, in clock ticks) around the sampling: the
# profile's percentages are shares of this. The fields after the ")" that closes the
# process name, which may hold spaces.
cpu_ticks="ticks=0; for pid in $(echo "$workers" | cut -d' ' -f2 | tr '\n' ' '); do
  set -- \$(sed 's/^.*) //' /proc/\$pid/stat); ticks=\$((ticks + \${12} + \${13})); done; echo \$ticks \$(getconf CLK_TCK)"
read -r ticks_before clock_tick < <(on_host "$cpu_ticks")
sample_start=$(date +%s%N)
sample_status=0
# py-spy stops itself after DURATION; the bound is for a host that stops answering.
timeout --kill-after=5 $((duration + 60)) "${host[@]}" "$sample" || sample_status=$?
sample_seconds=$(awk -v ns=$(($(date +%s%N) - sample_start)) 'BEGIN { printf "%.1f", ns / 1e9 }')
read -r ticks_after _ < <(on_host "$cpu_ticks" || echo "$ticks_before")
load_outlived=yes
kill -0 "$load_pid" 2>/dev/null || load_outlived=no
load_status=0
wait "$load_pid" || load_status=$?
load_pid=""

on_host "cd '$host_dir' && tar -cf - --exclude=py-spy -- *" | tar -C "$out" -xf -
host_info=$(on_host 'echo "$(hostname), $(nproc) cores"')
[ "$sample_status" = 0 ] || die "py-spy failed (status $sample_status): $(cat "$out"/*.log 2>/dev/null | grep -iv '^py-spy> \(sampling\|you can\)\|^$' | head -n 5)"
[ "$load_outlived" = yes ] || echo "profile_workers: WARNING: the load ended before sampling did; its tail is idle" >&2

{
  echo "# py-spy profile of falcon-svc workers"
  echo
  echo "- when: $started (UTC); host: $host_info${ssh_cmd:+ (via SSH)}"
  echo "- load: \`${load[*]}\` (exit status $load_status)"
  echo "- sampling: $(echo "$workers" | wc -l) worker(s), py-spy $("$py_spy" --version | cut -d' ' -f2)," \
    "record --rate $rate --duration $duration ${PY_SPY_OPTIONS:+$PY_SPY_OPTIONS }after ${warmup}s of load," \
    "raw ${raw_mode:-blocking}$([ "${FLAMEGRAPH:-1}" = 1 ] && echo ', svg --nonblocking')"
  awk -v ticks=$((ticks_after - ticks_before)) -v hz="$clock_tick" -v wall="$sample_seconds" 'BEGIN {
    printf "- workers CPU while sampled: %.2f s in %.1f s of wall time (%.0f%% of one core; utime+stime)\n",
      ticks / hz, wall, 100 * ticks / hz / wall }'
  echo "- py-spy's own CPU (user, system): $(cat "$out/py-spy.cpu" 2>/dev/null || echo unknown)"
  for log in "$out"/*.log; do
    echo "- $(basename "$log" .log): $(grep -o 'Samples: [0-9]* Errors: [0-9]*' "$log" || echo 'no summary')"
  done
  echo
  echo "Load output:"
  echo
  echo '```'
  tail -n 20 "$out/load.out"
  echo '```'
  echo
  "$python" scripts/bench/profile/top_frames.py "$out"/*.txt
} >"$out/profile.md"
cat "$out/profile.md"
echo "profile_workers: files in $out (flame graphs: *.svg, collapsed stacks: *.txt)" >&2
