#!/usr/bin/env bash
# Audit the locked runtime set for known vulnerabilities with pip-audit (`make audit`;
# `make test` runs it first): requirements.lock (the production host's packages),
# requirements-nodeps.lock, requirements-build.lock (pip, setuptools and wheel, which
# build the wheels), and meinheld 1.0.2, whose sdist scripts/meinheld/build_wheel.sh
# pins by hash outside the locks.
#
# Exit 1 when pip-audit reports a known vulnerability: CI must stop on it. When the
# vulnerability database cannot be reached (no network, a proxy or TLS failure, a timeout,
# the service answering 5xx) or some packages could not be audited (a mirror without
# PyPI's per-version JSON API), print a WARNING naming them and exit 0: an offline build
# still tests, and says loudly that it could not audit. Any other failure (a usage error,
# a lock file pip-audit cannot parse, a crash) exits 1: a broken audit must not pass.
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
  # pip-audit exits 1 both for a finding and for a crash: its JSON report (a finding) or
  # the last line of its traceback (an unreachable database) tells them apart.
  "$PYTHON" - "$requirements" "$report" "$report.err" "$code" <<'PY'
import json
import re
import sys

requirements, report, errors, code = sys.argv[1:]
# NOTE: only these mean "the database could not be asked"; they are what pip-audit 2.x
# lets escape when the network, a proxy, TLS or the service fails (its own
# ConnectionError wraps connect timeouts and redirect loops; a 5xx is a ServiceError
# raised from requests' HTTPError). Anything else is a broken invocation or lock file.
UNREACHABLE = re.compile(
    r"^(requests\.exceptions\.(ConnectionError|ProxyError|SSLError|ConnectTimeout|ReadTimeout|Timeout)"
    r"|pip_audit\._service\.interface\.ConnectionError)\b"
)
SERVER_ERROR = re.compile(r"^requests\.exceptions\.HTTPError: 5\d\d ", re.MULTILINE)


def unreachable(stderr: str) -> bool:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if not lines:
        return False
    last = lines[-1]
    if last.startswith("pip_audit._service.interface.ServiceError"):
        return bool(SERVER_ERROR.search(stderr))
    return bool(UNREACHABLE.match(last))


try:
    with open(report) as f:
        dependencies = json.load(f)["dependencies"]
except (OSError, ValueError, KeyError, TypeError):
    stderr = open(errors).read()
    # The line that names the problem: pip-audit's own ERROR line, else the traceback's last.
    said = [line for line in stderr.splitlines() if re.search(r"[A-Za-z]", line)] or ["no output"]
    last = next((line for line in said if line.startswith("ERROR:")), said[-1])
    if unreachable(stderr):
        print(f"WARNING: {requirements}: not audited, pip-audit could not reach its database: {last}")
        sys.exit(0)
    print(f"FAILED: {requirements}: pip-audit exited {code} without a report: {last}")
    sys.exit(1)
skipped = [d["name"] for d in dependencies if "skip_reason" in d]
if skipped:
    print(f"WARNING: {requirements}: {len(skipped)} of {len(dependencies)} packages not audited: {' '.join(skipped)}")
found = [d for d in dependencies if d.get("vulns")]
for d in found:
    for vuln in d["vulns"]:
        fixed = ", ".join(vuln.get("fix_versions") or []) or "no fixed version"
        print(f"VULNERABLE: {requirements}: {d['name']} {d['version']}: {vuln['id']} (fixed in {fixed})")
if not found and code not in ("0", "1"):
    print(f"FAILED: {requirements}: pip-audit exited {code}: {open(errors).read().strip()[-300:]}")
    sys.exit(1)
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
