#!/usr/bin/env bash
# Build the patched meinheld 1.0.2 wheel (build_wheel.sh) and install it into a venv:
# a development or CI venv (`make venv`). Production hosts never build it: the Ansible
# role installs the wheel built on the controller (scripts/build_wheelhouse.sh).
#
# Installed as 1.0.2+falcon.3 with --no-deps: its metadata pins greenlet<0.5, which does
# not build on Python 3.11; requirements.txt pins greenlet. Idempotent: does nothing
# when the patched version is already installed.
#
# Usage: scripts/meinheld/install.sh VENV_PYTHON [PIP_ARGS...]
set -euo pipefail

python=${1:?usage: install.sh VENV_PYTHON [PIP_ARGS...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
local_version=1.0.2+falcon.3

installed=$("$python" -c 'import importlib.metadata as m; print(m.version("meinheld"))' 2>/dev/null || true)
if [ "$installed" = "$local_version" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wheel=$(bash "$here/build_wheel.sh" "$python" "$work" "$@")
# The wheel was built here from the hash-checked sdist; nothing else is fetched.
"$python" -m pip install --quiet --no-deps --no-index "$wheel"
