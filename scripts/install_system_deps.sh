#!/usr/bin/env bash
# Install the Debian/Ubuntu packages that building, running and testing need.
# Idempotent: installs only what is missing; uses sudo when not root.
# Usage: install_system_deps.sh [extra-package ...]
#
# apt's locks: another apt or dpkg (unattended-upgrades, a software centre) may hold
# them. This waits for them, saying so, up to APT_LOCK_TIMEOUT seconds (default 300)
# in all, instead of failing at once.
#
# Services: on a booted machine (systemd is PID 1) apt starts and enables the daemons
# it installs (redis-server, postgresql, nginx, prometheus, node-exporter,
# alertmanager) on their standard ports. The tests start their own on free ports, and
# `make e2e` needs those ports free, so the daemons of the packages that THIS run
# installed are stopped and disabled, each one printed; daemons installed before are
# never touched. FALCON_KEEP_SERVICES=1 leaves them running. Without systemd as PID 1
# (a container, a chroot, CI) apt starts nothing, so there is nothing to stop.
set -euo pipefail

python=${PYTHON:-python3}
lock_timeout=${APT_LOCK_TIMEOUT:-300}
missing=()

need() {  # need PACKAGE PROBE-COMMAND...: add PACKAGE unless the probe succeeds
  local package=$1
  shift
  if [[ " ${missing[*]} " == *" $package "* ]]; then return 0; fi
  if ! "$@" >/dev/null 2>&1; then missing+=("$package"); fi
}

# venv + pip (Debian splits ensurepip out of python3)
need python3-venv "$python" -c 'import ensurepip'
# meinheld is built from source here (a development machine, CI, the Ansible controller;
# never on a production host, which installs the controller's wheel): a compiler and the
# headers of this Python
need python3-dev "$python" -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))'
need build-essential command -v gcc
need wrk command -v wrk
need curl command -v curl
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for extra in "$@"; do
  need "$extra" installed "$extra"
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: apt-get not found; install by hand: ${missing[*]}" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi

deadline=$((SECONDS + lock_timeout))

# apt_get ARGS...: run apt-get, retried while another process holds one of apt's or
# dpkg's locks, until the deadline. NOTE: apt 2.6 (Debian 12) honours
# DPkg::Lock::Timeout for the dpkg lock only, and silently under -qq; `apt-get update`
# fails at once on /var/lib/apt/lists/lock. apt takes its locks before changing
# anything, so retrying a run that failed on one is safe.
apt_get() {
  local output status said=-1
  while true; do
    status=0
    output=$("${sudo[@]}" env LC_ALL=C DEBIAN_FRONTEND=noninteractive apt-get "$@" 2>&1) || status=$?
    if [ "$status" -eq 0 ]; then
      return 0
    fi
    if ! grep -qE 'Could not get lock|Unable to (lock|acquire the dpkg frontend lock)' <<<"$output" \
      || [ "$SECONDS" -ge "$deadline" ]; then
      printf '%s\n' "$output" >&2
      [ "$SECONDS" -lt "$deadline" ] || echo "install_system_deps: apt's lock still held after ${lock_timeout} s" >&2
      return "$status"
    fi
    if [ "$said" -lt 0 ] || [ $((SECONDS - said)) -ge 30 ]; then
      echo "install_system_deps: waiting for apt's lock ($(grep -m1 -oE '(/[^ ]*lock[^ .]*)(\. It is held by process [0-9]+ \([^)]*\))?' <<<"$output" || echo 'held by another apt or dpkg')); up to $((deadline - SECONDS)) s more" >&2
      said=$SECONDS
    fi
    sleep 5
  done
}

installed_packages() { dpkg-query -W -f='${db:Status-Abbrev} ${binary:Package}\n' | awk '$1 == "ii" { print $2 }' | sort; }

# quiet_new_services BEFORE-LIST: stop and disable the enabled services that packages
# not in BEFORE-LIST (a file: the installed packages before this run) ship.
quiet_new_services() {
  local before=$1 package unit
  if [ ! -d /run/systemd/system ] || [ "${FALCON_KEEP_SERVICES:-}" = 1 ]; then
    return 0
  fi
  comm -13 "$before" <(installed_packages) | while read -r package; do
    dpkg-query -L "$package" | grep -E '^(/usr)?/lib/systemd/system/[^/@]+\.service$' || true
  done | xargs -r -n 1 basename | sort -u | while read -r unit; do
    if [ "$(systemctl is-enabled "$unit" 2>/dev/null)" = enabled ]; then
      "${sudo[@]}" systemctl disable --now --quiet "$unit"
      echo "install_system_deps: stopped and disabled $unit, which apt started on install (keep it: systemctl enable --now $unit)" >&2
    fi
  done
}

before=$(mktemp)
trap 'rm -f "$before"' EXIT
installed_packages >"$before"
echo "install_system_deps: installing ${missing[*]}" >&2
apt_get update -qq
apt_get install -y -qq --no-install-recommends "${missing[@]}"
quiet_new_services "$before"
