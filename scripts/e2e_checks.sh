#!/usr/bin/env bash
# The end-to-end assertions against a provisioned falcon-e2e host (scripts/e2e.sh up
# or test): the operator's health check (scripts/check_health.sh on the host: every
# unit, each worker's /readyz, nginx upstreams, Prometheus targets and alerts, the
# request-log backlog) before and after the drills, the workers' notify readiness and
# hardening, HTTP and HTTPS through nginx (80, 443), every failure-injection script run on the
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
read -r -a FAULTS <<<"${E2E_FAULTS:-stop_worker restart_storm rolling_restart kill_worker redis_down postgres_slow postgres_down cpu_spike}"
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
    -H 'Content-Type: application/json' -H "X-Request-ID: $SMOKE_ID-$name" --data-binary "$body" -H "@$WORK/auth.header" "$@"
}

# check_health WHEN: scripts/check_health.sh on the host, as an operator runs it.
# --wait: right after provisioning, Prometheus may not have scraped every target yet
# (15 s interval), and after a drill the breakers and replays need a moment.
check_health() {
  local when=$1 rc=0
  # The key through stdin (export is a builtin: it never shows in a process list).
  { printf 'export FALCON_API_KEY=%q\n' "$FALCON_API_KEY"; cat "$REPO_DIR/scripts/check_health.sh"; } \
    | ssh_cmd 'bash -s -- --wait 90' >"$RUN_DIR/health-$when.log" 2>&1 || rc=$?
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

# Supply chain (finding 12): no compiler on the host, the venv is exactly the lock (the
# wheelhouse the controller built), and the meinheld is our patched build.
normalize_pins() { awk -F'==' '{ name = tolower($1); gsub(/[_.]+/, "-", name); print name "==" $2 }' | sort; }
check_supply_chain() {
  local compilers venv=/opt/falcon-svc/venv
  compilers=$(ssh_cmd 'for c in gcc cc c++ g++ clang tcc; do command -v "$c"; done
    dpkg-query -W -f="\${Package} \${db:Status-Abbrev}\n" build-essential gcc python3-dev 2>/dev/null | awk "\$2 == \"ii\" { print \$1 }"' || true)
  check "the host has no C compiler or Python headers${compilers:+ (found: $(tr '\n' ' ' <<<"$compilers"))}" test -z "$compilers"
  ssh_cmd "$venv/bin/pip freeze" | grep -v ' @ ' | normalize_pins >"$WORK/venv-freeze.txt"
  { grep -hoE '^[A-Za-z0-9._-]+==[^ ]+' "$REPO_DIR/requirements.lock" "$REPO_DIR/requirements-nodeps.lock"
    echo meinheld==1.0.2+falcon.3; } | normalize_pins >"$WORK/venv-locked.txt"
  diff "$WORK/venv-locked.txt" "$WORK/venv-freeze.txt" | sed 's/^/    /' || true
  check "the host's venv holds exactly the locked versions (pip freeze vs requirements.lock + requirements-nodeps.lock)" \
    cmp -s "$WORK/venv-locked.txt" "$WORK/venv-freeze.txt"
  check "the host runs our patched meinheld 1.0.2+falcon.3" \
    test "$(ssh_cmd "$venv/bin/python -c 'import importlib.metadata as m; print(m.version(\"meinheld\"))'")" = 1.0.2+falcon.3
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
  check "/v1/models through nginx: name, version, labels and roles only (no metadata)" \
    test "$(py 'sorted({k for m in d["models"] for k in m})' "$WORK/public_models.json")" \
    = "['active', 'labels', 'name', 'serving', 'version']"
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

# TLS on 443 (roles/nginx): the role's self-signed certificate verifies for 127.0.0.1,
# TLS 1.1 is refused by nginx's own alert, plain HTTP to a non-loopback address (127.0.0.2
# reaches port 80 but is not the exempt 127.0.0.1) is redirected with 308, HSTS is sent.
check_tls() {
  local out path
  ssh_cmd cat /etc/nginx/tls/falcon-svc.crt >"$WORK/nginx-tls.pem"
  out=$(curl -sS -m 10 --cacert "$WORK/nginx-tls.pem" --tlsv1.2 -o /dev/null -w '%{http_code} %{ssl_verify_result}' https://127.0.0.1/healthz 2>&1 || true)
  check "https://127.0.0.1/healthz: 200 over TLS 1.2+, certificate verified ($out)" test "$out" = "200 0"
  out=$(curl -sS -m 10 -k --tlsv1.1 --tls-max 1.1 -o /dev/null https://127.0.0.1/healthz 2>&1 || true)
  check "TLS 1.1 refused by nginx (${out:0:100})" grep -q 'alert protocol version' <<<"$out"
  out=$(curl -sS -m 10 -o /dev/null -w '%{http_code} %{redirect_url}' -X POST --data-binary '{}' http://127.0.0.2/infer)
  check "plain HTTP -> 308 to https ($out)" test "$out" = "308 https://127.0.0.2/infer"
  out=$(curl -sS -m 10 -k -D - -o /dev/null https://127.0.0.1/healthz | tr -d '\r' | sed -n 's/^strict-transport-security: //Ip')
  check "HSTS over https ($out)" test "$out" = "max-age=63072000"
  for path in /metrics /metrics/ /METRICS; do
    out=$(curl -sS -m 10 -k -o /dev/null -w '%{http_code}' "https://127.0.0.1$path")
    check "$path over https: 404 ($out)" test "$out" = 404
  done
}

# API keys (finding 11): the inference routes need a key through nginx, health does not,
# the key file holds only a hash, the key is in no log, a reload keeps serving, and the
# request log names the key's id.
check_api_keys() {
  local out challenge rows=0 i
  out=$(curl -sS -m 10 -D "$WORK/noauth.headers" -o "$WORK/noauth.json" -w '%{http_code} %{content_type}' \
    "$URL/infer" -H 'Content-Type: application/json' -H 'X-Request-ID: e2e-auth-none' --data-binary '{"text": "no key"}')
  challenge=$(tr -d '\r' <"$WORK/noauth.headers" | sed -n 's/^www-authenticate: //Ip')
  check "POST /infer without a key through nginx: 401 JSON unauthorized, WWW-Authenticate ($out; $challenge)" \
    test "$out" = "401 application/json" -a "$challenge" = 'Bearer realm="falcon-svc"' \
    -a "$(py 'd["error"]["code"]' "$WORK/noauth.json")" = unauthorized
  out=$(curl -sS -m 10 -D "$WORK/badkey.headers" -o /dev/null -w '%{http_code}' "$URL/infer" \
    -H 'Content-Type: application/json' -H 'Authorization: Bearer fsk_e2e_not-the-key' --data-binary '{"text": "x"}')
  challenge=$(tr -d '\r' <"$WORK/badkey.headers" | sed -n 's/^www-authenticate: //Ip')
  check "POST /infer with a wrong key: 401, invalid_token ($out; $challenge)" \
    test "$out" = 401 -a "$challenge" = 'Bearer realm="falcon-svc", error="invalid_token"'
  out=$(curl -sS -m 10 -D "$WORK/authed.headers" -o "$WORK/authed.json" -w '%{http_code} %{content_type}' "$URL/infer" \
    -H 'Content-Type: application/json' -H "@$WORK/auth.header" -H 'X-Request-ID: e2e-auth-ok' --data-binary '{"text": "I love it"}')
  check "POST /infer with the e2e key through nginx: 200, X-Client-Key-Id e2e ($out)" \
    eval 'test "$out" = "200 application/json" && tr -d "\r" <"$WORK/authed.headers" | grep -qix "x-client-key-id: e2e"'
  out=$(curl -sS -m 10 -o /dev/null -w '%{http_code}' "$URL/healthz")
  check "GET /healthz needs no key ($out)" test "$out" = 200
  out=$(ssh_cmd "stat -c '%a %U:%G' /etc/falcon-svc/api_keys; grep -c '^e2e [0-9a-f]\{64\}\$' /etc/falcon-svc/api_keys; \
    journalctl -u 'falcon-worker@*' -o cat --no-pager | grep -cF -f /root/.falcon-e2e-api-key; \
    grep -rlF -f /root/.falcon-e2e-api-key /etc/falcon-svc /var/log/nginx | wc -l" | tr '\n' ' ')
  check "api_keys 0640 root:falcon with one e2e hash; the key in no journal line, no file in /etc/falcon-svc or nginx's logs ($out)" \
    test "$out" = "640 root:falcon 1 0 0 "
  ssh_cmd 'systemctl reload falcon-worker@8001 falcon-worker@8002'
  out=$(post after_reload /infer '{"text": "after the reload"}')
  check "systemctl reload of the workers: the key still works ($out)" test "$out" = "200 application/json"
  # Rows are written after the answer: give the writer a few seconds.
  for i in 1 2 3 4 5 6 7 8 9 10; do
    rows=$(ssh_cmd "cd / && runuser -u postgres -- psql -X -At -d falcon -c \
      \"SELECT count(*) FROM request_log WHERE request_id = 'e2e-auth-ok' AND client_key_id = 'e2e'\"")
    [[ $rows -ge 1 ]] && break
    sleep 1
  done
  check "request_log names the key's id, not the key (client_key_id = e2e: $rows row, after ${i} s)" test "$rows" -eq 1
}

run_faults() {
  local name rc
  say "copying the failure-injection scripts to the host"
  tar -C "$REPO_DIR/scripts/faults" -cf - lib.sh loadgen.py "${FAULTS[@]/%/.sh}" \
    | ssh_cmd 'rm -rf /root/falcon-faults && mkdir -p /root/falcon-faults && tar -xf - -C /root/falcon-faults'
  for name in "${FAULTS[@]}"; do
    say "--- $name.sh on the host"
    if ssh_cmd "FALCON_API_KEY=\$(cat /root/.falcon-e2e-api-key) /root/falcon-faults/$name.sh" 2>&1 | tee "$RUN_DIR/fault-$name.log" | sed 's/^/    /'; then
      rc=0
    else
      rc=1
    fi
    check "$name.sh: $(grep -o 'VERDICT: .*' "$RUN_DIR/fault-$name.log" || echo "no verdict, exit $rc")" \
      test "$rc" -eq 0
  done
}

# check_runbook: every non-destructive command and PromQL expression of docs/RUNBOOK.md and
# docs/UBUNTU_DEPLOYMENT.md runs on the host and exits 0 (scripts/run_runbook.py); the
# destructive ones are listed with the drill that covers each.
check_runbook() {
  local rc=0
  python3 "$REPO_DIR/scripts/run_runbook.py" --api-key-file /root/.falcon-e2e-api-key \
    --ssh "ssh -i $KEY -p $SSH_PORT -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=5 -o BatchMode=yes root@127.0.0.1" \
    >"$RUN_DIR/runbook.log" 2>&1 || rc=$?
  sed 's/^/    /' "$RUN_DIR/runbook.log"
  check "runbook: $(grep -o 'VERDICT: .*' "$RUN_DIR/runbook.log" || echo "no verdict, exit $rc")" test "$rc" -eq 0
}

check_journal() {
  # Fields journalctl filters on (falcon_svc/journal.py): one request by id, with why it was refused.
  # NOTE: first: the role's ACCESS_LOG=errors writes access lines for answers >= 400 only
  # (nginx's access log has every request), so after the drills this 422 may be the newest.
  local id="$SMOKE_ID-journal-422" out fields events pid since lines
  post journal-422 /infer '{"text": ""}' >/dev/null || true
  for _ in $(seq 20); do
    out=$(ssh_cmd "journalctl -u 'falcon-worker@*' REQUEST_ID=$id -o cat --no-pager")
    [[ -n $out ]] && break
    sleep 0.5
  done
  fields=$(ssh_cmd "journalctl -u 'falcon-worker@*' REQUEST_ID=$id -o verbose --no-pager" \
    | grep -oE '^ *(SYSLOG_IDENTIFIER|STATUS|ERROR_CODE|PRIORITY)=[^ ]*' | tr -d ' ' | sort | tr '\n' ' ')
  ssh_cmd "journalctl -u 'falcon-worker@*' -o cat --no-pager -n 2000" >"$WORK/journal.txt"
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
  check "journalctl -u 'falcon-worker@*' holds JSON request lines ($lines of the last 2000)" test "$lines" -gt 0

  say "    journalctl REQUEST_ID=$id: $out"
  say "    its fields: $fields"
  check "journalctl REQUEST_ID= finds the one 422 line, with its code and field" \
    grep -q '"status": 422.*"code": "invalid_input", "field": "text"' <<<"$out"
  check "the access line's journal fields: falcon-access, STATUS=422, ERROR_CODE=invalid_input, PRIORITY=6" \
    test "$fields" = "ERROR_CODE=invalid_input PRIORITY=6 STATUS=422 SYSLOG_IDENTIFIER=falcon-access "
  events=$(ssh_cmd "journalctl -u 'falcon-worker@*' -t falcon-svc -o cat --no-pager -n 500")
  check "journalctl -t falcon-svc lists events without access lines ($(wc -l <<<"$events") lines)" \
    bash -c '! grep -q "\"logger\": \"falcon_svc.access\"" <<<"$1" && test -n "$1"' _ "$events"
  # An error at its priority: gunicorn's master logs a worker's SIGKILL at error.
  since=$(ssh_cmd 'date "+%Y-%m-%d %H:%M:%S"')
  pid=$(ssh_cmd "pgrep -P \$(systemctl show -p MainPID --value falcon-worker@8001) | sed -n 1p")
  ssh_cmd "kill -KILL $pid"
  for _ in $(seq 20); do
    out=$(ssh_cmd "journalctl -u falcon-worker@8001 -p err --since '$since' -o cat --no-pager")
    grep -q "SIGKILL" <<<"$out" && break
    sleep 0.5
  done
  check "journalctl -p err shows the master's error line for a SIGKILLed worker (pid $pid)" grep -q "SIGKILL" <<<"$out"
  ssh_cmd "until curl -fsS -m 2 http://127.0.0.1:8001/readyz >/dev/null; do sleep 0.5; done"
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

# Retention (finding 10): the timer is listed, a backdated day is dropped by the job and
# the journal says so, partitions exist ahead, rows carry the keyed digest.
check_retention() {
  local day next part since out rc=0 sql_rc=0 q="cd / && runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -d falcon"
  day=$(date -u -d '40 days ago' +%F); next=$(date -u -d '39 days ago' +%F); part=request_log_${day//-/}
  check "falcon-svc-retention.timer is listed" \
    ssh_cmd "systemctl list-timers --all --no-legend falcon-svc-retention.timer | grep -q falcon-svc-retention.service"
  check "falcon-svc-retention.timer is active" ssh_cmd systemctl is-active --quiet falcon-svc-retention.timer
  # A backdated day, as the owner (the job drops only what the owner owns), with a row in it.
  ssh_cmd "$q" <<SQL || sql_rc=$?
SET ROLE falcon_owner;
CREATE TABLE $part PARTITION OF request_log FOR VALUES FROM ('$day 00:00+00') TO ('$next 00:00+00');
INSERT INTO request_log (log_id, request_id, received_at) VALUES ('$SMOKE_ID-retention', '$SMOKE_ID-retention', '$day 12:00+00');
SQL
  check "a backdated partition $part with a row was created" test "$sql_rc" -eq 0
  since=$(ssh_cmd date +%s)
  ssh_cmd systemctl start falcon-svc-retention.service || rc=$?
  check "falcon-svc-retention.service ran and exited 0" test "$rc" -eq 0
  check "the partition $part is gone" test "$(ssh_cmd "$q -c \"SELECT to_regclass('$part') IS NULL\"")" = t
  check "its row is gone" test "$(ssh_cmd "$q -c \"SELECT count(*) FROM request_log WHERE log_id = '$SMOKE_ID-retention'\"")" = 0
  out=$(ssh_cmd "journalctl -u falcon-svc-retention.service --since @$since -o cat")
  sed 's/^/    /' <<<"$out"
  check "the journal names the dropped partition" grep -qF "dropped partition $part [$day 00:00Z" <<<"$out"
  check "the journal has the run's summary" grep -qF "dropped 1 partition(s)" <<<"$out"
  check "partitions exist for today and 7 days ahead" test "$(ssh_cmd "$q -c \"SELECT count(*) FROM generate_series(0, 7) n WHERE to_regclass('request_log_' || to_char(now() AT TIME ZONE 'UTC' + n * interval '1 day', 'YYYYMMDD')) IS NOT NULL\"")" = 8
  check "smoke rows carry a keyed digest (text_hmac, 64 hex)" test "$(ssh_cmd "$q -c \"SELECT count(*) FROM request_log WHERE starts_with(request_id, '$SMOKE_ID-') AND status = 200 AND length(text_hmac) = 64\"")" -ge 1
  check "the HMAC key file is root-only" test "$(ssh_cmd "stat -c '%U %a' /etc/falcon-svc/log_text_hmac.secret")" = "root 600"
  local exposure
  exposure=$(ssh_cmd systemd-analyze security falcon-svc-retention.service 2>&1 | sed -nE 's/.*Overall exposure level for falcon-svc-retention.service: ([0-9.]+).*/\1/p')
  check "falcon-svc-retention.service exposure ${exposure:-unknown} <= $SECURITY_LIMIT" \
    python3 -c "import sys; sys.exit(not float('${exposure:-99}') <= $SECURITY_LIMIT)"
}

# Finding 13: the model is signed on the host, verified before unpickling, and the service
# user can neither write it nor read the signing key.
MODEL_DIR_ON_HOST=${MODEL_DIR_ON_HOST:-/opt/falcon-svc/models/sentiment}
MODEL_PUBLIC_KEY_ON_HOST=${MODEL_PUBLIC_KEY_ON_HOST:-/etc/falcon-svc/model-signing.pub}
MODEL_SIGNING_KEY_ON_HOST=${MODEL_SIGNING_KEY_ON_HOST:-/etc/falcon-svc-signing/model-signing.key}
FALCON_SVC_ON_HOST=${FALCON_SVC_ON_HOST:-/opt/falcon-svc/venv/bin/falcon-svc}
ENV_FILE_ON_HOST=${ENV_FILE_ON_HOST:-/etc/falcon-svc/falcon-svc.env}

check_model_signing() {
  # `falcon-svc check` as the service runs it: user falcon, the env file read inside the
  # shell (off the command line), the model from the store; given a directory, that
  # directory instead (MODEL_STORE emptied), to check a tampered copy.
  local as_service="set -a; . $ENV_FILE_ON_HOST; set +a; if [ -n \"\${1:-}\" ]; then MODEL_DIR=\$1 MODEL_STORE=; fi; exec $FALCON_SVC_ON_HOST check"
  local expected signature rc=0
  # The key id computed apart from falcon-svc: ed25519: + 16 hex of sha256(the raw 32-byte key).
  expected=ed25519:$(ssh_cmd "openssl pkey -pubin -in $MODEL_PUBLIC_KEY_ON_HOST -outform DER | tail -c 32 | sha256sum | cut -c1-16")
  ssh_cmd "runuser -u falcon -- sh -c '$as_service'" >"$WORK/model_check.out" 2>&1 || rc=$?
  signature=$(sed -nE 's/^ *"model_signature": "([^"]*)".*/\1/p' "$WORK/model_check.out")
  say "falcon-svc check: model_signature: ${signature:-none} (rc $rc)"
  check "falcon-svc check as falcon: the model's signature verified with key $expected" \
    test "$rc" -eq 0 -a "$signature" = "verified with key $expected"
  check "the env file points the service at the public key (MODEL_PUBLIC_KEY)" \
    test "$(ssh_cmd "sed -n 's/^MODEL_PUBLIC_KEY=//p' $ENV_FILE_ON_HOST")" = "$MODEL_PUBLIC_KEY_ON_HOST"
  check "the model directory, its files and the public key are root's and read-only to others" \
    test "$(ssh_cmd "stat -c '%U:%G %a' $MODEL_DIR_ON_HOST $MODEL_DIR_ON_HOST/* $MODEL_PUBLIC_KEY_ON_HOST | sort -u | tr '\n' ' '")" \
    = "root:root 644 root:root 755 "
  local path
  for path in "$MODEL_DIR_ON_HOST" "$MODEL_DIR_ON_HOST/model.joblib" "$MODEL_DIR_ON_HOST/metadata.json" \
    "$MODEL_DIR_ON_HOST/signature.json" "$MODEL_PUBLIC_KEY_ON_HOST"; do
    check "the service user cannot write $path" \
      test "$(ssh_cmd "runuser -u falcon -- test -w $path && echo writable || echo read-only")" = read-only
  done
  local store
  store=$(ssh_cmd "sed -n 's/^MODEL_STORE=//p' $ENV_FILE_ON_HOST")
  check "the env file names the model store ($store), whose active version the workers serve" \
    test -n "$store" -a "$(ssh_cmd "readlink $store/active")" != ""
  for path in "$store" "$store/versions" "$store/versions/$(ssh_cmd "basename \$(readlink $store/active)")"; do
    check "the service user cannot write $path" \
      test "$(ssh_cmd "runuser -u falcon -- test -w $path && echo writable || echo read-only")" = read-only
  done
  check "the service user cannot read the signing key $MODEL_SIGNING_KEY_ON_HOST" \
    test "$(ssh_cmd "runuser -u falcon -- test -r $MODEL_SIGNING_KEY_ON_HOST && echo readable || echo unreadable")" = unreadable
  # A tampered copy (one byte of metadata changed, the signature kept) is refused with exit 66.
  rc=0
  ssh_cmd "t=\$(mktemp -d) && cp -a $MODEL_DIR_ON_HOST/. \$t/ && sed -i '0,/\"kind\"/s//\"kind\" /' \$t/metadata.json \
    && chmod -R a+rX \$t && runuser -u falcon -- sh -c '$as_service' sh \$t; rc=\$?; rm -rf \$t; exit \$rc" \
    >"$WORK/model_tampered.out" 2>&1 || rc=$?
  say "tampered copy: $(grep -m1 -o 'cannot load the model.*' "$WORK/model_tampered.out" | cut -c1-200)"
  check "a tampered copy of the model is refused: exit 66 naming signature.json and key $expected ($rc)" \
    test "$rc" -eq 66 -a -n "$(grep 'signature.json does not verify' "$WORK/model_tampered.out" | grep -F "$expected")"
}

# Backups (issue 12 item 6): the timer, a dump by the service, the runbook's restore drill.
check_backup_restore() {
  local q="cd / && runuser -u postgres -- psql -X -At -d falcon -c" before after dump out started rc=0
  check "falcon-svc-backup.timer is enabled and has a next run" ssh_cmd \
    "systemctl is-enabled --quiet falcon-svc-backup.timer && systemctl list-timers --no-legend falcon-svc-backup.timer | grep -q falcon-svc-backup.service"
  before=$(ssh_cmd "$q 'SELECT count(*) FROM request_log'")
  started=$(ssh_cmd date +%s)
  ssh_cmd systemctl start falcon-svc-backup.service || rc=$?
  # The script's own line (systemd's "Finished ..." comes after it).
  out=$(ssh_cmd "journalctl -u falcon-svc-backup.service -o cat --no-pager --since @$started | grep ' wrote ' | tail -n 1")
  say "    $out ($(($(date +%s) - started)) s)"
  check "systemctl start falcon-svc-backup.service wrote a dump of every row ($before)" \
    grep -q "wrote /var/backups/falcon-svc/falcon-.*, $before request_log rows" <<<"$out"
  check "the backup unit succeeded" test "$rc" -eq 0
  dump=$(ssh_cmd "ls -1 /var/backups/falcon-svc/falcon-*.dump | tail -n 1")
  check "the dump is postgres-only (dir 0700, file 0600)" test \
    "$(ssh_cmd "stat -c '%U %a' /var/backups/falcon-svc $dump" | tr '\n' ' ')" = "postgres 700 postgres 600 "
  # docs/RUNBOOK.md "Restore the request log", step by step; requests sent while the
  # table is missing must land once it is back (spooled, then replayed).
  started=$(date +%s); rc=0
  ssh_cmd "systemctl stop falcon-svc-retention.timer && $q 'CREATE TABLE request_log_salvage AS TABLE request_log;' && $q 'DROP TABLE request_log CASCADE;'" || rc=$?
  local answered=0
  for i in 1 2 3; do
    if [[ $(post "restore-$i" /infer '{"text": "sent while request_log is gone"}') == 200* ]]; then answered=$((answered + 1)); fi
  done
  ssh_cmd "cd / && runuser -u postgres -- falcon-svc-backup restore $dump" >"$RUN_DIR/restore.log" 2>&1 || rc=$?
  sed 's/^/    /' "$RUN_DIR/restore.log"
  ssh_cmd "$q 'INSERT INTO request_log SELECT * FROM request_log_salvage ON CONFLICT (log_id, received_at) DO NOTHING;' && $q 'DROP TABLE request_log_salvage;' && systemctl start falcon-svc-retention.timer" || rc=$?
  say "    restore drill: $(($(date +%s) - started)) s"
  check "the runbook's restore commands succeeded" test "$rc" -eq 0
  check "requests answered 200 while request_log was gone ($answered of 3)" test "$answered" -eq 3
  after=$(ssh_cmd "$q \"SELECT count(*) FROM request_log WHERE NOT starts_with(request_id, '$SMOKE_ID-restore-')\"")
  check "request_log rows back after the restore ($after of $before)" test "$after" -eq "$before"
  for _ in $(seq 60); do
    out=$(ssh_cmd "$q \"SELECT count(*) FROM request_log WHERE starts_with(request_id, '$SMOKE_ID-restore-')\"")
    [[ $out == 3 ]] && break
    sleep 1
  done
  check "the 3 requests answered while the table was gone are logged once ($out)" test "$out" = 3
}

# check_load_baseline: issue 13's k6 baseline (tests/load/baseline.js) through nginx, from
# outside the host like a client: the full request mix (unique texts, repeats, batches,
# idempotent replays that must come back replayed) at 40/s for 10 s, under the API key's
# own rate limit (50/s), so nothing is lifted for it. Every threshold must hold.
check_load_baseline() {
  local status=0 summary
  [[ -x $REPO_DIR/.venv/bin/k6 ]] || {
    check "k6 is installed (.venv/bin/k6: make venv, requirements-load.lock)" false
    return
  }
  (cd "$REPO_DIR" && FALCON_API_KEY=$FALCON_API_KEY LOAD_RATE=40 LOAD_DURATION=10s LOAD_REQUIRE_IDEMPOTENCY=1 \
    LOAD_RESULTS_DIR="$WORK/load" bash scripts/load_test.sh baseline "$URL") >"$WORK/k6.out" 2>&1 || status=$?
  summary=$(grep -E '^(baseline: |thresholds crossed: )' "$WORK/k6.out" | paste -sd ' ' -)
  [[ $status == 0 ]] || tail -n 30 "$WORK/k6.out" >&2
  check "the k6 baseline (40/s for 10 s, mixed) holds every threshold: ${summary:-no summary}" test "$status" = 0
}

# check_model_lifecycle: issue 14's rollouts on the host under load (scripts/e2e_canary.sh):
# a good version promoted by the canary play, a bad one rolled back by it, `models rollback
# --reload` and `models activate --reload`; 0 failed requests. Its PASS/FAIL lines are shown,
# and one line here sums them up.
check_model_lifecycle() {
  local rc=0
  E2E_RUN_DIR=$RUN_DIR bash "$REPO_DIR/scripts/e2e_canary.sh" >"$WORK/model_lifecycle.out" 2>&1 || rc=$?
  sed 's/^/    /' "$WORK/model_lifecycle.out"
  check "the model lifecycle on the host: $(grep -c '] PASS ' "$WORK/model_lifecycle.out") checks passed, $(grep -c '] FAIL ' "$WORK/model_lifecycle.out") failed (scripts/e2e_canary.sh exit $rc)" \
    test "$rc" -eq 0
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ssh_cmd true || die "no falcon-e2e host answers on port $SSH_PORT (scripts/e2e.sh up)"
# The drills' API key (scripts/e2e.sh puts it in the inventory): a 0600 header file for curl
# here, a root-only file on the host for the scripts run there; never on a command line.
FALCON_API_KEY=$(sed -nE 's/.* vault_falcon_svc_e2e_api_key=([^ ]+).*/\1/p' "$RUN_DIR/inventory.ini")
[[ -n $FALCON_API_KEY ]] || die "no vault_falcon_svc_e2e_api_key in $RUN_DIR/inventory.ini (scripts/e2e.sh up)"
(umask 077 && printf 'Authorization: Bearer %s\n' "$FALCON_API_KEY" >"$WORK/auth.header")
printf '%s\n' "$FALCON_API_KEY" | ssh_cmd 'umask 077 && cat >/root/.falcon-e2e-api-key'
started=$(date +%s)
say "== health";           check_health "after provisioning"
say "== worker unit";      check_worker_unit
say "== supply chain";     check_supply_chain
say "== HTTP via nginx";   check_http
say "== k6 baseline";      check_load_baseline
say "== TLS";              check_tls
say "== request log";      check_request_log
say "== API keys";         check_api_keys
say "== retention";        check_retention
say "== model signing";    check_model_signing
say "== backups";          check_backup_restore
say "== model lifecycle";  check_model_lifecycle
say "== fault scripts";    run_faults
say "== health";           check_health "after the drills"
say "== runbook";          check_runbook
say "== journal";          check_journal
say "== Prometheus";       check_prometheus
say "== Grafana files";    check_grafana_files
say "checks took $(($(date +%s) - started)) s"
verdict
