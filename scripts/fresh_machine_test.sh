#!/usr/bin/env bash
# Prove that `make test` and `make run` work from a clone on a pristine Debian 12 machine.
#
#   sudo scripts/fresh_machine_test.sh [REPO [REF]]
#
#   REPO  what to clone (default: this checkout)
#   REF   what to test (default: REPO's HEAD commit). Only committed work is tested:
#         uncommitted changes in this checkout are NOT in the clone.
#
# 1. A pristine Debian 12 root: debootstrap --variant=minbase plus git, make, python3,
#    ca-certificates and sudo. Built once and kept as a tarball in FRESH_CACHE_DIR
#    (default /var/cache/falcon-fresh-machine); every run unpacks a new copy.
# 2. `git clone` REPO at REF into it (/root/falcon-svc).
# 3. `make test` with CI=1 (a missing tool fails, tests/tools.py) under systemd-nspawn,
#    not booted: nothing is PID 1 that apt could start services with, as in CI.
# 4. `make run` in the background until /readyz answers 200 and one POST /infer answers
#    200; then it is stopped. The container shares this machine's network, so BIND is a
#    free port, and REDIS_URL and DATABASE_URL name free ports too: whatever else runs
#    here on 6379 and 5432 is not the fresh machine's (the service serves degraded).
# Prints a summary (pytest's final line, durations, exit codes) and exits non-zero if a
# step failed. The unpacked root is always removed; the logs of `make test` and `make
# run` are kept in a directory the summary names. Runs as root.
#
# Environment: FRESH_CACHE_DIR, FRESH_WORK_DIR (where the root is unpacked and the logs
# go, default /var/tmp), FRESH_KEEP=1 (keep the unpacked root too), READY_TIMEOUT (s, 300).
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO=${1:-$REPO_DIR}
REF=${2:-}
CACHE_DIR=${FRESH_CACHE_DIR:-/var/cache/falcon-fresh-machine}
WORK_PARENT=${FRESH_WORK_DIR:-/var/tmp}
READY_TIMEOUT=${READY_TIMEOUT:-300}
SUITE=bookworm
PACKAGES=git,make,python3,ca-certificates,sudo
TARBALL=$CACHE_DIR/debian12-minbase-$(printf '%s' "$SUITE $PACKAGES" | sha256sum | cut -c1-12).tar
CLONE=/root/falcon-svc
MACHINE=falcon-fresh-$$

log() { printf '[fresh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $EUID -eq 0 ]] || die "run as root: debootstrap and systemd-nspawn need it"
for tool in debootstrap systemd-nspawn git curl python3; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install debootstrap systemd-container git curl)"
done
if [[ -z $REF ]]; then
  REF=$(git -C "$REPO" rev-parse HEAD) || die "cannot resolve HEAD of $REPO; pass a REF"
fi
if [[ $REPO == "$REPO_DIR" ]] && [[ -n $(git -C "$REPO_DIR" status --porcelain --untracked-files=no) ]]; then
  log "NOTE: $REPO_DIR has uncommitted changes; they are not tested (only $REF is)"
fi

# build_root: debootstrap the pristine root into the cache as a tarball (once).
build_root() {
  local mirror tmp start
  # The machine's own Debian mirror, as scripts/e2e.sh does.
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  mkdir -p "$CACHE_DIR"
  tmp=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
  start=$SECONDS
  log "debootstrap $SUITE minbase + $PACKAGES from $mirror (once; about 2 minutes)"
  if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp/root" "$mirror" \
    >"$CACHE_DIR/debootstrap.log" 2>&1; then
    rm -rf --one-file-system "$tmp"
    die "debootstrap failed, see $CACHE_DIR/debootstrap.log"
  fi
  # The apt sources of a standard install (main, updates, security) from the machine's
  # own file, when it has one: the mirror it names is the one this machine can reach.
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    cp /etc/apt/sources.list.d/debian.sources "$tmp/root/etc/apt/sources.list.d/"
    rm -f "$tmp/root/etc/apt/sources.list"
  fi
  rm -rf "$tmp/root/var/cache/apt/archives/"*.deb "$tmp/root/var/lib/apt/lists/"*_Packages
  tar --numeric-owner -C "$tmp/root" -cf "$tmp/root.tar" .
  mv "$tmp/root.tar" "$TARBALL"
  rm -rf --one-file-system "$tmp"
  log "built $TARBALL in $((SECONDS - start)) s"
}

# fit_to_this_network ROOT: what this machine's network needs of any machine on it.
fit_to_this_network() {
  local root=$1
  # NOTE: this machine's outbound HTTPS goes through a TLS-inspecting proxy whose CA is
  # in /usr/local/share/ca-certificates: without it pip cannot reach PyPI. A pristine
  # machine elsewhere has neither the proxy nor the CA, and needs neither.
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    systemd-nspawn -q -D "$root" --register=no --keep-unit --console=pipe --machine="$MACHINE" \
      update-ca-certificates >/dev/null
  fi
  # NOTE: pip (the one `make` upgrades .venv to) uses its own CA bundle unless told
  # otherwise, so it gets the system bundle the way this machine's /etc/pip.conf says.
  # Nothing else of the machine's pip configuration is copied: its find-links and extra
  # indexes are directories of this machine, which a pristine one does not have.
  if grep -qsE '^cert *=' /etc/pip.conf; then
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
  fi
}

# nspawn ROOT ARGS...: run a command in the root, not booted, in the clone.
nspawn() {
  local root=$1
  shift
  systemd-nspawn -q -D "$root" --register=no --keep-unit --console=pipe --machine="$MACHINE" \
    --chdir="$CLONE" "$@"
}

started=$SECONDS
WORK=$(mktemp -d "$WORK_PARENT/falcon-fresh.XXXXXX")
LOGS=$(mktemp -d "$WORK_PARENT/falcon-fresh-logs.XXXXXX")
ROOT=$WORK/root
RUN_PID=
cleanup() {
  local status=$?
  if [[ -n $RUN_PID ]] && kill -0 "$RUN_PID" 2>/dev/null; then
    kill -TERM "$RUN_PID" 2>/dev/null || true
    wait "$RUN_PID" 2>/dev/null || true
  fi
  if [[ -n ${FRESH_KEEP:-} ]]; then
    log "kept $WORK (FRESH_KEEP)"
  else
    rm -rf --one-file-system "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step=$SECONDS
if [[ -f $TARBALL ]]; then
  log "reusing $TARBALL"
else
  build_root
fi
mkdir "$ROOT"
tar --numeric-owner -C "$ROOT" -xf "$TARBALL"
fit_to_this_network "$ROOT"
root_seconds=$((SECONDS - step))

step=$SECONDS
if [[ -d $REPO/.git ]]; then
  # --no-local: a real clone (objects copied, not hard-linked into this checkout).
  git clone --quiet --no-local "$REPO" "$ROOT$CLONE"
else
  git clone --quiet "$REPO" "$ROOT$CLONE"
fi
git -C "$ROOT$CLONE" -c advice.detachedHead=false checkout --quiet "$REF"
commit=$(git -C "$ROOT$CLONE" rev-parse HEAD)
log "cloned $REPO at $commit"
clone_seconds=$((SECONDS - step))

step=$SECONDS
log "make test (CI=1), log: $LOGS/make-test.log"
test_status=0
nspawn "$ROOT" --setenv=CI=1 make test </dev/null >"$LOGS/make-test.log" 2>&1 || test_status=$?
test_seconds=$((SECONDS - step))
# pytest's closing line, e.g. "===== 3 failed, 408 passed, 2 skipped in 612.3s (0:10:12) =====".
summary=$(sed 's/\x1b\[[0-9;]*m//g' "$LOGS/make-test.log" \
  | grep -E '^=+ .*[0-9]+ (passed|failed|errors?|skipped).* =+$' | tail -n 1 || true)
log "make test exited $test_status after $test_seconds s: ${summary:-no pytest summary line}"

step=$SECONDS
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
url=http://127.0.0.1:$port
log "make run with BIND=127.0.0.1:$port, log: $LOGS/make-run.log"
setsid systemd-nspawn -q -D "$ROOT" --register=no --keep-unit --console=pipe --machine="$MACHINE" \
  --chdir="$CLONE" --setenv=BIND="127.0.0.1:$port" \
  --setenv=REDIS_URL="redis://127.0.0.1:$(free_port)/0" \
  --setenv=DATABASE_URL="postgresql://falcon@127.0.0.1:$(free_port)/falcon" make run </dev/null >"$LOGS/make-run.log" 2>&1 &
RUN_PID=$!
run_status=1
ready=no
infer=no
deadline=$((SECONDS + READY_TIMEOUT))
while ((SECONDS < deadline)) && kill -0 "$RUN_PID" 2>/dev/null; do
  if [[ $(curl -s -o /dev/null -m 2 -w '%{http_code}' "$url/readyz" || true) == 200 ]]; then
    ready=yes
    break
  fi
  sleep 1
done
if [[ $ready == yes ]]; then
  reply=$(curl -s -m 10 -w ' %{http_code}' "$url/infer" -H 'Content-Type: application/json' \
    -d '{"text": "The delivery was quick and the staff were lovely."}' || true)
  log "POST /infer: $reply"
  if [[ $reply == *'"label"'*' 200' ]]; then
    infer=yes
    run_status=0
  fi
fi
grep -q "falcon-svc on $url " "$LOGS/make-run.log" || { log "make run did not print $url"; run_status=1; }
# nspawn answers SIGTERM by killing the container's processes (gunicorn with them).
kill -TERM "$RUN_PID" 2>/dev/null || true
wait "$RUN_PID" 2>/dev/null || true
RUN_PID=
run_seconds=$((SECONDS - step))
if ((run_status != 0)); then
  log "make run failed; the end of its log:"
  tail -n 30 "$LOGS/make-run.log" >&2
fi
if ((test_status != 0)); then
  log "make test failed; its failures:"
  grep -E '^(FAILED|ERROR) |^E   ' "$LOGS/make-test.log" | head -n 60 >&2 || tail -n 40 "$LOGS/make-test.log" >&2
fi
status=$((test_status != 0 || run_status != 0))
cat <<EOF
== fresh Debian 12 machine: $REPO at $commit
   root (unpack, network fit): ${root_seconds} s; clone: ${clone_seconds} s
   make test (CI=1): exit $test_status in ${test_seconds} s
     ${summary:-no pytest summary line}
   make run: ready=$ready, POST /infer 200=$infer, exit $run_status, ${run_seconds} s
   logs: $LOGS
   total: $((SECONDS - started)) s; verdict: $([[ $status == 0 ]] && echo PASS || echo FAIL)
EOF
exit "$status"
