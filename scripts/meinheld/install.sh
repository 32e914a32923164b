#!/usr/bin/env bash
# Build and install meinheld 1.0.2 with our patches into a venv.
#
# meinheld is unmaintained (last release 2020) and is built from its sdist anyway:
# its wheels do not cover Python 3.11. We verify the sdist against the hash PyPI
# published, apply scripts/meinheld/*.patch in order (each says what it fixes and
# why), and install it as 1.0.2+falcon.2 with --no-deps (its metadata pins
# greenlet<0.5, which does not build on Python 3.11; requirements.txt pins greenlet).
# Idempotent: does nothing when the patched version is already installed.
#
# Usage: scripts/meinheld/install.sh VENV_PYTHON [PIP_ARGS...]
set -euo pipefail

python=${1:?usage: install.sh VENV_PYTHON [PIP_ARGS...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
version=1.0.2
local_version="$version+falcon.2"
sdist_sha256=008c76937ac2117cc69e032dc69cea9f85fc605de9bac1417f447c41c16a56d6

installed=$("$python" -c 'import importlib.metadata as m; print(m.version("meinheld"))' 2>/dev/null || true)
if [ "$installed" = "$local_version" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "meinheld: building $local_version (patched) from the PyPI sdist" >&2
"$python" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" \
  --require-hashes --requirement /dev/stdin "$@" <<<"meinheld==$version --hash=sha256:$sdist_sha256"
tar -xzf "$work/meinheld-$version.tar.gz" -C "$work"
# Named, not globbed: a patch missing from a copy of this directory (the Ansible role
# copies the files one by one) fails the build instead of installing a build labelled
# as patched that lacks a fix.
patches=(
  0001-json-error-pages.patch
  0002-early-100-continue.patch
  0003-local-version.patch
  0004-slow-clients-and-descriptors.patch
)
for patch_file in "${patches[@]}"; do
  patch --quiet --forward --strip=1 --directory="$work/meinheld-$version" <"$here/$patch_file"
done
"$python" -m pip install --quiet --no-deps "$@" "$work/meinheld-$version"
