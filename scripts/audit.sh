#!/usr/bin/env bash
# Audit the locked runtime set for known vulnerabilities with pip-audit (`make audit`;
# `make test` runs it first): requirements.lock (the production host's packages),
# requirements-nodeps.lock, requirements-build.lock (pip, setuptools and wheel, which
# build the wheels), and meinheld 1.0.2, whose sdist scripts/meinheld/build_wheel.sh
# pins by hash outside the locks.
#
# Exit 1 when pip-audit reports a known vulnerability: CI must stop on it. When the
# vulnerability database cannot be asked (no network, a mirror without PyPI's per-version
# JSON API) or some packages could not be audited, print a WARNING naming them and exit 0:
# an offline build still tests, and says loudly that it could not audit.
# The locks are exact, complete and hashed, so pip-audit reads them as written
# (--require-hashes --disable-pip): nothing is resolved or installed.
#
# Environment (optional):
#   PIP_AUDIT         the pip-audit executable (default .venv/bin/pip-audit)
#   PYTHON            reads pip-audit's JSON report (default .venv/bin/python)
#   AUDIT_REQUIREMENTS the files to audit (default: the three locks and the meinheld pin)
# Extra arguments go to pip-audit (e.g. --vulnerability-service osv).
set -uo pipefail # no -e: pip-audit's exit code is judged below, not fatal by itself

PIP_AUDIT=${PIP_AUDIT:-.venv/bin/pip-audit}
PYTHON=${PYTHON:-.venv/bin/python}
report=$(mktemp)
pins=$(mktemp -d)
meinheld=$pins/meinheld-sdist.txt
trap 'rm -rf "$report" "$report.err" "$pins"' EXIT
sdist_sha256=$(sed -nE 's/^sdist_sha256=([0-9a-f]{64})$/\1/p' "$(dirname "$0")/meinheld/build_wheel.sh")
echo "meinheld==1.0.2 --hash=sha256:$sdist_sha256" >"$meinheld"
read -r -a requirement_files <<<"${AUDIT_REQUIREMENTS:-requirements.lock requirements-nodeps.lock requirements-build.lock $meinheld}"
failed=0
for requirements in "${requirement_files[@]}"; do
  : >"$report"
  "$PIP_AUDIT" --requirement "$requirements" --require-hashes --disable-pip --progress-spinner off \
    --format json --output "$report" "$@" 2>"$report.err"
  code=$?
  # pip-audit exits 1 both for a finding and for a crash (an unreachable service):
  # only its JSON report tells them apart.
  "$PYTHON" - "$requirements" "$report" "$report.err" <<'PY'
import json
import sys

requirements, report, errors = sys.argv[1:]
try:
    with open(report) as f:
        dependencies = json.load(f)["dependencies"]
except (OSError, ValueError, KeyError):
    lines = open(errors).read().strip().splitlines() or ["no report"]
    print(f"WARNING: {requirements}: not audited, pip-audit could not ask its database: {lines[-1]}")
    sys.exit(0)
skipped = [d["name"] for d in dependencies if "skip_reason" in d]
if skipped:
    print(f"WARNING: {requirements}: {len(skipped)} of {len(dependencies)} packages not audited: {' '.join(skipped)}")
found = [d for d in dependencies if d.get("vulns")]
for d in found:
    for vuln in d["vulns"]:
        fixed = ", ".join(vuln.get("fix_versions") or []) or "no fixed version"
        print(f"VULNERABLE: {requirements}: {d['name']} {d['version']}: {vuln['id']} (fixed in {fixed})")
sys.exit(1 if found else 0)
PY
  judged=$?
  rm -f "$report.err"
  if ((judged != 0)); then
    failed=1
  elif ((code == 0)); then
    echo "audit: ${requirements}: no known vulnerability in what could be audited"
  fi
done
exit "$failed"
