#!/usr/bin/env bash
# Build the patched meinheld 1.0.2 wheel (1.0.2+falcon.3) into a directory.
#
# meinheld is unmaintained (last release 2020) and its wheels do not cover Python 3.11,
# so it is built from its sdist: we verify the sdist against the hash PyPI published,
# apply scripts/meinheld/*.patch in order (each says what it fixes and why) and build a
# wheel. The build needs a compiler and Python's headers: it runs on a development
# machine (install.sh) or on the Ansible controller (scripts/build_wheelhouse.sh),
# never on a production host, which installs the wheel. setuptools must be installed
# in VENV_PYTHON's environment: the build runs without isolation, so pip fetches no
# unpinned setuptools for it (requirements-build.lock pins ours).
#
# Usage: scripts/meinheld/build_wheel.sh VENV_PYTHON WHEEL_DIR [PIP_ARGS...]
# Prints the wheel's path.
set -euo pipefail

python=${1:?usage: build_wheel.sh VENV_PYTHON WHEEL_DIR [PIP_ARGS...]}
wheel_dir=${2:?usage: build_wheel.sh VENV_PYTHON WHEEL_DIR [PIP_ARGS...]}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
version=1.0.2
sdist_sha256=008c76937ac2117cc69e032dc69cea9f85fc605de9bac1417f447c41c16a56d6

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "meinheld: building $version+falcon.3 (patched) from the PyPI sdist" >&2
"$python" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation --dest "$work" \
  --require-hashes --requirement /dev/stdin "$@" <<<"meinheld==$version --hash=sha256:$sdist_sha256"
tar -xzf "$work/meinheld-$version.tar.gz" -C "$work"
# Named, not globbed: a patch missing from a copy of this directory fails the build
# instead of producing a build labelled as patched that lacks a fix.
patches=(
  0001-json-error-pages.patch
  0002-early-100-continue.patch
  0003-local-version.patch
  0004-slow-clients-and-descriptors.patch
  0005-drain-once-for-good.patch
)
for patch_file in "${patches[@]}"; do
  patch --quiet --forward --strip=1 --directory="$work/meinheld-$version" <"$here/$patch_file"
done
mkdir -p "$wheel_dir"
"$python" -m pip wheel --quiet --no-deps --no-build-isolation --no-index --wheel-dir "$work/wheel" \
  "$work/meinheld-$version"
wheel=$(find "$work/wheel" -name 'meinheld-*.whl')
[[ $(basename "$wheel") == "meinheld-$version+falcon.3-"* ]] || {
  echo "meinheld: built $(basename "$wheel"), not $version+falcon.3: a patch did not apply" >&2
  exit 1
}
mv "$wheel" "$wheel_dir/"
echo "$wheel_dir/$(basename "$wheel")"
