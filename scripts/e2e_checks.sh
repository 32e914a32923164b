#!/usr/bin/env bash
# The end-to-end assertions against a provisioned falcon-e2e host (scripts/e2e.sh up
# or test): the operator's health check (scripts/check_health.sh on the host: every
# unit, each worker's /readyz, nginx upstreams, Prometheus targets and alerts, the
# request-log backlog) before and after the drills, the workers' notify readiness and
# hardening, HTTP through nginx on port 80, every failure-injection script run on the
# host, journal JSON lines, Prometheus rules and Alertmanager, Grafana's provisioning,
# and the request log. One PASS/FAIL line per check; exits 1 if any failed.
#
#   scripts/e2e_checks.sh              all of it (about 4 minutes)
#   E2E_FAULTS="stop_worker" scripts/e2e_checks.sh    only these fault scripts
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=faults/lib.sh
source "$REPO_DIR/scripts/faults/lib.sh"
FAULT_NAME=e2e
RUN_DIR=${E2E_RUN_DIR:-/tmp/falcon-e2e}
KEY=$RUN_DIR/id_ed25519
SSH_PORT=${E2E_SSH_PORT:-2222}
URL=http://127.0.0.1
read -r -a FAULTS <<<"${E2E_FAULTS:-stop_worker rolling_restart kill_worker redis_down postgres_slow cpu_spike}"
SMOKE_ID=e2e-smoke-$(date +%s)
# systemd-analyze security's exposure bound; README.md and tests/unit/test_systemd_units.py say the same.
SECURITY_LIMIT=1.5

ssh_cmd() {
  ssh -i "$KEY" -p "$SSH_PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o LogLevel=ERROR -o ConnectTimeout=5 -o BatchMode=yes root@127.0.0.1 "$@"
}

# py EXPR FILE: evaluate a Python expression over the JSON in FILE (as `d`).
py() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($1)" "$2"; }

# post NAME PATH BODY [curl args...]: POST through nginx; the body lands in $WORK/NAME.json,
# and "STATUS CONTENT-TYPE" is printed.
post() {
  local name=$1 path=$2 body=$3
  shift 3
  curl -sS -m 10 -o "$WORK/$name.json" -w '%{http_code} %{content_type}' "$URL$path" \
    -H 'Content-Type: application/json' -H "X-Request-ID: $SMOKE_ID-$name" --data-binary "$body" "$@"
}

# check_health WHEN: scripts/check_health.sh on the host, as an operator runs it.
# --wait: right after provisioning, Prometheus may not have scraped every target yet
# (15 s interval), and after a drill the breakers and replays need a moment.
check_health() {
  local when=$1 rc=0
  ssh_cmd 'bash -s -- --wait 90' <"$REPO_DIR/scripts/check_health.sh" >"$RUN_DIR/health-$when.log" 2>&1 || rc=$?
  sed 's/^/    /' "$RUN_DIR/health-$when.log"
  check "check_health.sh $when: $(tail -n 1 "$RUN_DIR/health-$when.log")" test "$rc" -eq 0
}

check_worker_unit() {
  local props
  props=$(ssh_cmd systemctl show -p Type -p NotifyAccess -p WatchdogUSec -p StatusText falcon-worker@8001)
  say "falcon-worker@8001: $(tr '\n' ' ' <<<"$props")"
  ssh_cmd systemctl status --no-pager --lines=0 falcon-worker@8001 | sed 's/^/    /'
  check "falcon-worker@8001 is Type=notify and its status says it serves" \
    grep -qzE 'Type=notify.*StatusText=serving' <<<"$props"
  check "falcon-worker@8001 has the systemd watchdog on" grep -q '^WatchdogUSec=[1-9]' <<<"$props"
  local exposure
  exposure=$(ssh_cmd systemd-analyze security --no-pager falcon-worker@8001.service \
    | sed -nE 's/.*Overall exposure level for .*: ([0-9.]+).*/\1/p')
  say "systemd-analyze security falcon-worker@8001: exposure $exposure"
  check "exposure ${exposure:-unknown} <= $SECURITY_LIMIT" \
    python3 -c "import sys; sys.exit(not float('${exposure:-99}') <= $SECURITY_LIMIT)"
}

check_http() {
  local out
  out=$(post positive /infer '{"text": "The delivery was quick and the staff were lovely."}')
  check "POST /infer through nginx: 200 JSON positive ($out, $(py 'd.get("label")' "$WORK/positive.json"))" \
    test "$out" = "200 application/json" -a "$(py 'd["label"]' "$WORK/positive.json")" = positive
  out=$(post negative /infer '{"text": "Terrible service, the parcel arrived broken and nobody answered."}')
  check "POST /infer: negative text is negative ($(py 'd.get("label")' "$WORK/negative.json"))" \
    test "$out" = "200 application/json" -a "$(py 'd["label"]' "$WORK/negative.json")" = negative
  out=$(post batch /infer/batch '{"texts": ["I love it", "I hate it", "It is on the table"]}')
  check "POST /infer/batch: 3 results ($out, $(py 'len(d.get("results", []))' "$WORK/batch.json"))" \
    test "$out" = "200 application/json" -a "$(py 'len(d["results"])' "$WORK/batch.json")" = 3
  # The model's kind and scorer are internal detail: ask a worker on the host's loopback.
  ssh_cmd "curl -sS -m 10 http://127.0.0.1:8001/v1/models" >"$WORK/models.json"
  local model
  model=$(py '" ".join(str(d["models"][0][k]) for k in ("kind", "version", "scorer"))' "$WORK/models.json")
  check "the trained model serves with the compiled scorer, not the dummy ($model)" \
    grep -qE '^tfidf-lexicon-logreg [^ ]+ compiled$' <<<"$model"
  out=$(post bad_json /infer '{"text": ')
  check "malformed JSON: 400 JSON invalid_json ($out, $(py 'd["error"]["code"]' "$WORK/bad_json.json"))" \
    test "$out" = "400 application/json" -a "$(py 'd["error"]["code"]' "$WORK/bad_json.json")" = invalid_json
  out=$(post no_text /infer '{"txt": "typo"}')
  check "missing text: 422 JSON naming the field ($out, $(py 'd["error"]' "$WORK/no_text.json"))" \
    test "$out" = "422 application/json" -a "$(py 'd["error"]["field"]' "$WORK/no_text.json")" = text
  head -c 3000000 /dev/zero | tr '\0' a >"$WORK/big.txt"
  out=$(curl -sS -m 10 -o "$WORK/big.json" -w '%{http_code} %{content_type}' "$URL/infer" \
    -H 'Content-Type: application/json' --data-binary @"$WORK/big.txt")
  check "3 MB body: nginx answers 413 JSON ($out)" \
    test "$out" = "413 application/json" -a "$(py 'd["error"]["code"]' "$WORK/big.json")" = payload_too_large
  out=$(curl -sS -m 10 -o /dev/null -w '%{http_code}' "$URL/metrics")
  check "workers' /metrics not exposed through nginx ($out)" test "$out" = 404
  out=$(curl -sS -m 10 -o /dev/null -w '%{http_code}' "$URL/metrics/")
  check "nor /metrics/ ($out)" test "$out" = 404
  curl -sS -m 10 -o "$WORK/public_readyz.json" "$URL/readyz"
  check "/readyz through nginx says status only ($(cat "$WORK/public_readyz.json"))" \
    test "$(py 'sorted(d)' "$WORK/public_readyz.json")" = "['status']"
  curl -sS -m 10 -o "$WORK/public_models.json" "$URL/v1/models"
  check "/v1/models through nginx: name, version, labels only" \
    test "$(py 'sorted(d["models"][0])' "$WORK/public_models.json")" = "['labels', 'name', 'version']"
  # Redis ACL users (roles/redis): the service's user cannot flush or reconfigure, the
  # exporter reads INFO, an anonymous client gets nothing. Passwords via REDISCLI_AUTH.
  # redis-cli follows each error with an empty line: the check reads first words of non-empty lines.
  local redis_acl
  redis_acl=$(ssh_cmd 'bash -s' 2>&1 <<'EOF'
app_pw=$(sed -n 's|^REDIS_URL=redis://falcon:\([^@]*\)@.*|\1|p' /etc/falcon-svc/falcon-svc.env)
exp_pw=$(sed -n 's|^REDIS_PASSWORD=||p' /etc/default/prometheus-redis-exporter)
REDISCLI_AUTH=$app_pw redis-cli --user falcon FLUSHALL 2>&1
REDISCLI_AUTH=$app_pw redis-cli --user falcon CONFIG SET maxmemory 1 2>&1
REDISCLI_AUTH=$exp_pw redis-cli --user exporter INFO server 2>&1 | grep -c '^redis_version:'
redis-cli PING 2>&1
EOF
  )
  check "Redis ACL: falcon cannot FLUSHALL or CONFIG SET, exporter reads INFO, anonymous refused ($(tr '\n' ' ' <<<"$redis_acl"))" \
    test "$(awk 'NF {printf "%s ", $1}' <<<"$redis_acl")" = "NOPERM NOPERM 1 NOAUTH "
  check "GET / through nginx: the demo page" grep -q 'src="/static/app.js"' <(curl -sS -m 10 "$URL/")
  out=$(curl -sS -m 10 -o /dev/null -w '%{http_code}' "$URL/docs/swagger-ui-bundle.js")
  check "GET /docs/swagger-ui-bundle.js through nginx ($out)" test "$out" = 200
  # The deployed meinheld is our patched build: its own 413 is JSON, and curl's
  # Expect: 100-continue (sent for bodies over 1 KiB) gets its 100 at once.
  out=$(ssh_cmd "curl -sS -m 10 -o /dev/null -w '%{http_code} %{content_type}' -H 'Content-Type: application/json' \
    -H 'Content-Length: 10000000000' -X POST http://127.0.0.1:8001/infer" || true)
  check "10 GB Content-Length straight to a worker: 413 JSON ($out)" test "$out" = "413 application/json"
}

run_faults() {
  local name rc
  say "copying the failure-injection scripts to the host"
  tar -C "$REPO_DIR/scripts/faults" -cf - lib.sh loadgen.py "${FAULTS[@]/%/.sh}" \
    | ssh_cmd 'rm -rf /root/falcon-faults && mkdir -p /root/falcon-faults && tar -xf - -C /root/falcon-faults'
  for name in "${FAULTS[@]}"; do
    say "--- $name.sh on the host"
    if ssh_cmd "/root/falcon-faults/$name.sh" 2>&1 | tee "$RUN_DIR/fault-$name.log" | sed 's/^/    /'; then
      rc=0
    else
      rc=1
    fi
    check "$name.sh: $(grep -o 'VERDICT: .*' "$RUN_DIR/fault-$name.log" || echo "no verdict, exit $rc")" \
      test "$rc" -eq 0
  done
}

check_journal() {
  ssh_cmd journalctl -u falcon-worker@8001 -o cat --no-pager -n 2000 >"$WORK/journal.txt"
  local lines
  lines=$(python3 - "$WORK/journal.txt" <<'EOF'
import json, sys
count = 0
for line in open(sys.argv[1]):
    if line.startswith("{"):
        record = json.loads(line)
        if record.get("logger") == "falcon_svc.access" and {"request_id", "status", "latency_ms"} <= record.keys():
            count += 1
print(count)
EOF
)
  check "journalctl -u falcon-worker@8001 holds JSON request lines ($lines of the last 2000)" test "$lines" -gt 0
}

# Every target being up is check_health's; here, that Prometheus has all 7 of them.
check_prometheus() {
  curl -fsS -m 5 "http://127.0.0.1:9090/api/v1/targets?state=active" -o "$WORK/targets.json"
  local jobs
  jobs=$(py '" ".join(sorted(t["labels"]["job"] for t in d["data"]["activeTargets"]))' "$WORK/targets.json")
  check "Prometheus scrapes 7 targets: 2 workers, nginx, node, postgres, prometheus, redis ($jobs)" \
    test "$jobs" = "falcon falcon nginx node postgres prometheus redis"
  curl -fsS -m 5 "http://127.0.0.1:9090/api/v1/alertmanagers" -o "$WORK/alertmanagers.json"
  check "Prometheus sends alerts to the local Alertmanager ($(py '[a["url"] for a in d["data"]["activeAlertmanagers"]]' "$WORK/alertmanagers.json"))" \
    test "$(py 'len(d["data"]["activeAlertmanagers"])' "$WORK/alertmanagers.json")" -eq 1
  curl -fsS -m 5 "http://127.0.0.1:9090/api/v1/rules" -o "$WORK/rules.json"
  check "Prometheus loaded the recording and alerting rules ($(py 'sum(len(g["rules"]) for g in d["data"]["groups"])' "$WORK/rules.json") rules)" \
    test "$(py 'sum(len(g["rules"]) for g in d["data"]["groups"])' "$WORK/rules.json")" -gt 30
}

# Grafana's package cannot be installed here (its APT repository is unreachable),
# so check what the role wrote for it: the dashboards where the provider looks.
check_grafana_files() {
  local path listed
  path=$(ssh_cmd "sed -nE 's/^ *path: *//p' /etc/grafana/provisioning/dashboards/*.y*ml")
  listed=$(ssh_cmd "cd $path && printf '%s ' *.json")
  check "the dashboard provider's path $path holds the dashboards ($listed)" \
    test "$listed" = "$(cd "$REPO_DIR/grafana/dashboards" && printf '%s ' *.json)"
  check "the Grafana datasource points at the Prometheus that answers" \
    ssh_cmd "grep -q 'url: http://127.0.0.1:9090' /etc/grafana/provisioning/datasources/*.y*ml && curl -fsS -m 5 http://127.0.0.1:9090/-/ready"
}

check_request_log() {
  local rows
  # All smoke requests to /infer and /infer/batch reached a worker, except the
  # 3 MB body nginx refused (sent without an X-Request-ID of ours).
  rows=$(ssh_cmd "cd / && runuser -u postgres -- psql -X -At -d falcon -c \
    \"SELECT count(DISTINCT request_id) FROM request_log WHERE starts_with(request_id, '$SMOKE_ID-')\"")
  check "request_log has one row per smoke request ($rows of 5)" test "$rows" -eq 5
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ssh_cmd true || die "no falcon-e2e host answers on port $SSH_PORT (scripts/e2e.sh up)"
started=$(date +%s)
say "== health";           check_health "after provisioning"
say "== worker unit";      check_worker_unit
say "== HTTP via nginx";   check_http
say "== request log";      check_request_log
say "== fault scripts";    run_faults
say "== health";           check_health "after the drills"
say "== journal";          check_journal
say "== Prometheus";       check_prometheus
say "== Grafana files";    check_grafana_files
say "checks took $(($(date +%s) - started)) s"
verdict
