#!/usr/bin/env bash
# Install the Debian/Ubuntu packages that building, running and testing need.
# Idempotent: installs only what is missing; uses sudo when not root.
# Usage: install_system_deps.sh [extra-package ...]
set -euo pipefail

python=${PYTHON:-python3}
missing=()

need() {  # need PACKAGE PROBE-COMMAND...: add PACKAGE unless the probe succeeds
  local package=$1
  shift
  if ! "$@" >/dev/null 2>&1; then missing+=("$package"); fi
}

# venv + pip (Debian splits ensurepip out of python3)
need python3-venv "$python" -c 'import ensurepip'
# meinheld is built from source: a compiler and the headers of this Python
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
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "install_system_deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
