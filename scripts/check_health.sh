#!/usr/bin/env bash
# One look at a deployed falcon-svc host, first thing in triage (docs/RUNBOOK.md):
# every unit the Ansible roles install, each worker's /readyz, whether nginx and
# Prometheus know each worker, the Prometheus targets and firing alerts, the
# request-log backlog, and the API key file (with FALCON_API_KEY: one /infer with it). One line per check, OK or FAIL (SKIP for what this host does
# not install); exit 1 if any check failed, 0 otherwise.
#
# Run it ON the host, as root (it reads the env file and the spool directory):
#   bash scripts/check_health.sh                          # from a checkout (make check-health)
#   ssh root@HOST 'bash -s' < scripts/check_health.sh     # from the controller, nothing copied
#   bash scripts/check_health.sh --wait 90                # retry until all OK or 90 s passed
#
# Environment (optional):
#   FALCON_ENV_FILE   the units' env file, for LOG_SPOOL_DIR   (default /etc/falcon-svc/falcon-svc.env)
#   FALCON_NGINX_SITE the rendered nginx site with the upstreams (default /etc/nginx/conf.d/falcon-svc.conf)
#   PROMETHEUS_URL    Prometheus' HTTP API                     (default http://127.0.0.1:9090)
#   FALCON_API_KEY    an API key: check that a worker accepts it  (default none: not checked)
set -uo pipefail # no -e: a failing check is recorded and reported, never fatal

ENV_FILE=${FALCON_ENV_FILE:-/etc/falcon-svc/falcon-svc.env}
NGINX_SITE=${FALCON_NGINX_SITE:-/etc/nginx/conf.d/falcon-svc.conf}
PROMETHEUS_URL=${PROMETHEUS_URL:-http://127.0.0.1:9090}
DEFAULT_SPOOL_DIR=/var/lib/falcon-svc/spool
# Units the roles install besides the workers (roles redis, postgresql, nginx,
# prometheus, node_exporter, exporters). tests/ops/test_docs.py keeps this list in step
# with the roles' systemd_service tasks.
SERVICE_UNITS=(nginx redis-server postgresql prometheus prometheus-alertmanager prometheus-node-exporter
  prometheus-nginx-exporter prometheus-redis-exporter prometheus-postgres-exporter
  falcon-svc-retention.timer falcon-svc-backup.timer)
# Installed only where the roles may install them (grafana_install_package: false skips
# Grafana; the host firewall's unit exists only with firewall_enabled: true).
OPTIONAL_UNITS=(grafana-server falcon-firewall)

WAIT_SECONDS=0
FAILED=0
LINES=()
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# result STATUS KIND NAME DETAIL: one row of the table.
result() {
  LINES+=("$(printf '%-4s  %-9s %-36s %s' "$1" "$2" "$3" "$4")")
  if [[ $1 == FAIL ]]; then FAILED=$((FAILED + 1)); fi
}

# py FILE CODE [ARGS...]: run Python CODE over the JSON in FILE (as `d`; ARGS are
# sys.argv[2:]); CODE prints result rows as "STATUS<tab>KIND<tab>NAME<tab>DETAIL" lines.
py() {
  local file=$1 code=$2
  shift 2
  python3 -c "import json, sys
try:
    d = json.load(open(sys.argv[1]))
except ValueError as ex:
    print(f'FAIL\tjson\t{sys.argv[1]}\tnot JSON ({ex})')
    raise SystemExit
$code" "$file" "$@"
}

# rows: read "STATUS<tab>KIND<tab>NAME<tab>DETAIL" lines into the table. Feed it with
# `rows < <(...)`, not a pipe: a pipe runs it in a subshell, and the rows would be lost.
rows() {
  local status kind name detail
  while IFS=$'\t' read -r status kind name detail; do
    [[ -n $status ]] && result "$status" "$kind" "$name" "$detail"
  done
}

worker_ports() {
  # The deployed set (the instances falcon-svc.target wants) plus any loaded by hand.
  {
    systemctl show --property=Wants --value falcon-svc.target | tr ' ' '\n'
    systemctl list-units --all --plain --no-legend 'falcon-worker@*.service' | awk '{print $1}'
  } | sed -nE 's/^falcon-worker@([0-9]+)\.service$/\1/p' | sort -nu
}

postgresql_clusters() {
  systemctl list-units --all --plain --no-legend 'postgresql@*.service' | awk '{print $1}' | sed 's/\.service$//'
}

check_unit() {
  local unit=$1 state
  state=$(systemctl is-active "$unit" 2>/dev/null)
  if [[ $state == active ]]; then
    result OK unit "$unit" active
  else
    result FAIL unit "$unit" "${state:-unknown} (systemctl status $unit; journalctl -u $unit -n 50)"
  fi
}

check_units() {
  local unit port ports=("$@")
  check_unit falcon-svc.target
  for port in "${ports[@]}"; do check_unit "falcon-worker@$port"; done
  ((${#ports[@]})) || result FAIL unit 'falcon-worker@*' "no instances: none wanted by falcon-svc.target, none loaded"
  for unit in "${SERVICE_UNITS[@]}"; do check_unit "$unit"; done
  # The retention job is a oneshot the timer starts: idle between runs, but its last run must not have failed.
  if systemctl is-failed --quiet falcon-svc-retention.service; then
    result FAIL unit falcon-svc-retention.service "last run failed (journalctl -u falcon-svc-retention.service)"
  fi
  if systemctl is-failed --quiet falcon-svc-backup.service; then
    result FAIL unit falcon-svc-backup.service "last backup failed (journalctl -u falcon-svc-backup.service)"
  fi
  local clusters
  clusters=$(postgresql_clusters)
  if [[ -n $clusters ]]; then
    for unit in $clusters; do check_unit "$unit"; done
  else
    result FAIL unit 'postgresql@*' "no PostgreSQL cluster unit loaded (pg_lsclusters)"
  fi
  for unit in "${OPTIONAL_UNITS[@]}"; do
    if [[ -n $(systemctl list-unit-files --no-legend "$unit.service" 2>/dev/null) ]]; then
      check_unit "$unit"
    else
      result SKIP unit "$unit" "not installed here"
    fi
  done
}

check_readyz() {
  local port=$1 code
  code=$(curl -sS -m 3 -o "$WORK/readyz-$port.json" -w '%{http_code}' "http://127.0.0.1:$port/readyz" 2>"$WORK/curl.err")
  if [[ $code == 000 ]]; then
    result FAIL readyz "falcon-worker@$port" "no answer on 127.0.0.1:$port ($(head -c 120 "$WORK/curl.err"))"
    return
  fi
  rows < <(py "$WORK/readyz-$port.json" "
name = 'falcon-worker@$port'
log = d.get('request_log') or {}
problems = list(d.get('reasons', [])) + list(d.get('warnings', []))
if log.get('postgres') in ('down', 'circuit_open'):
    problems.append('request log: postgres ' + log['postgres'])
model = d.get('model') or {}
detail = f\"HTTP $code {d.get('status')}, model {model.get('version')} {model.get('scorer')}, \" \
         f\"request log: postgres {log.get('postgres')}, queue {log.get('queue_depth')}, spool {log.get('spool_bytes')} B\"
ok = '$code' == '200' and not problems
print('OK' if ok else 'FAIL', 'readyz', name, detail + ('' if ok else ': ' + '; '.join(problems)), sep='\t')
")
}

check_nginx_upstream() {
  local port=$1
  if grep -qE "^[[:space:]]*server 127\.0\.0\.1:${port}[[:space:];]" "$NGINX_SITE" 2>/dev/null; then
    result OK nginx "falcon-worker@$port" "upstream in $NGINX_SITE"
  else
    result FAIL nginx "falcon-worker@$port" "not an upstream in $NGINX_SITE: raise falcon_svc_workers and rerun the playbook"
  fi
}

check_prometheus_targets() {
  local ports=("$@")
  if ! curl -fsS -m 5 -o "$WORK/targets.json" "$PROMETHEUS_URL/api/v1/targets?state=active" 2>"$WORK/curl.err"; then
    result FAIL target prometheus "API at $PROMETHEUS_URL unreachable ($(head -c 120 "$WORK/curl.err"))"
    return
  fi
  rows < <(py "$WORK/targets.json" "
targets = d['data']['activeTargets']
for t in sorted(targets, key=lambda t: (t['labels']['job'], t['labels']['instance'])):
    name = t['labels']['job'] + ' ' + t['labels']['instance']
    error = t.get('lastError') or ''
    print('OK' if t['health'] == 'up' else 'FAIL', 'target', name, t['health'] + (': ' + error if error else ''), sep='\t')
scraped = {t['labels']['instance'] for t in targets if t['labels']['job'] == 'falcon'}
for port in sys.argv[2:]:
    if '127.0.0.1:' + port not in scraped:
        print('FAIL', 'target', 'falcon 127.0.0.1:' + port, 'falcon-worker@' + port + ' is not scraped: '
              'raise falcon_svc_workers and rerun the playbook', sep='\t')
if not targets:
    print('FAIL', 'target', 'prometheus', 'no active targets', sep='\t')
" "${ports[@]}")
}

check_alerts() {
  if ! curl -fsS -m 5 -o "$WORK/alerts.json" "$PROMETHEUS_URL/api/v1/alerts" 2>"$WORK/curl.err"; then
    result FAIL alerts prometheus "API at $PROMETHEUS_URL unreachable"
    return
  fi
  rows < <(py "$WORK/alerts.json" "
alerts = d['data']['alerts']
firing = [a for a in alerts if a['state'] == 'firing']
for a in firing:
    labels = a['labels']
    where = labels.get('instance') or labels.get('dependency') or labels.get('mountpoint') or ''
    print('FAIL', 'alert', labels['alertname'] + (' ' + where if where else ''),
          labels.get('severity', '?') + ' since ' + a.get('activeAt', '?') + ' (docs/RUNBOOK.md#' + labels['alertname'].lower() + ')', sep='\t')
if not firing:
    print('OK', 'alerts', 'prometheus', f'none firing ({len(alerts) - len(firing)} pending)', sep='\t')
")
}

# prom_value QUERY: the value of an instant query that returns one number (0 when empty).
prom_value() {
  curl -fsS -m 5 -G "$PROMETHEUS_URL/api/v1/query" --data-urlencode "query=$1" -o "$WORK/query.json" \
    && python3 -c "import json, sys
result = json.load(open(sys.argv[1]))['data']['result']
print(f'{float(result[0][\"value\"][1]):.0f}' if result else 0)" "$WORK/query.json"
}

check_backlog() {
  local spool_dir bytes files rejected dropped queue
  spool_dir=$(sed -nE 's/^LOG_SPOOL_DIR=//p' "$ENV_FILE" 2>/dev/null | tail -n 1)
  spool_dir=${spool_dir:-$DEFAULT_SPOOL_DIR}
  if [[ ! -d $spool_dir ]]; then
    result FAIL backlog "spool $spool_dir" "no such directory (LOG_SPOOL_DIR in $ENV_FILE)"
  else
    read -r files bytes < <(find "$spool_dir" -maxdepth 1 -type f -name '*spool-*.jsonl' -printf '%s\n' \
      | awk '{n++; s += $1} END {printf "%d %d\n", n, s}')
    if ((bytes == 0)); then
      result OK backlog "spool $spool_dir" "0 bytes waiting for PostgreSQL"
    else
      result FAIL backlog "spool $spool_dir" "$bytes bytes in $files files waiting for PostgreSQL (RUNBOOK: Spool growing)"
    fi
    rejected=$(find "$spool_dir" -maxdepth 1 -type f -name 'rejected-*.jsonl' | wc -l)
    if ((rejected == 0)); then
      result OK backlog "rejected rows" "none set aside"
    else
      result FAIL backlog "rejected rows" "$rejected rejected-*.jsonl files in $spool_dir: rows PostgreSQL refused"
    fi
  fi
  if dropped=$(prom_value 'sum(increase(falcon_request_log_rows_total{outcome="dropped"}[1h]))') \
    && queue=$(prom_value 'sum(falcon_request_log_queue_depth)'); then
    if ((dropped == 0)); then
      result OK backlog "request log (Prometheus)" "0 rows dropped in the last hour, $queue queued in memory"
    else
      result FAIL backlog "request log (Prometheus)" "$dropped rows dropped in the last hour (spool full), $queue queued"
    fi
  else
    result FAIL backlog "request log (Prometheus)" "query to $PROMETHEUS_URL failed"
  fi
}

# check_api_keys PORT: the key file the workers read (API_KEYS_FILE in the env file), and
# with FALCON_API_KEY set, that the worker on PORT answers an /infer sent with it. The key
# reaches curl through a 0600 header file (printf is a builtin), never a command line,
# where ps shows it to every user of the host.
check_api_keys() {
  local port=$1 keys_file count mode code
  keys_file=$(sed -nE 's/^API_KEYS_FILE=//p' "$ENV_FILE" 2>/dev/null | tail -n 1)
  if [[ -z $keys_file ]]; then
    result SKIP apikeys "API_KEYS_FILE" "API keys off: /infer is open (falcon_svc_api_keys_enabled: false)"
    return
  fi
  if [[ ! -r $keys_file ]]; then
    result FAIL apikeys "$keys_file" "missing or unreadable: the workers cannot start (rerun the playbook)"
  else
    count=$(grep -cvE '^[[:space:]]*(#|$)' "$keys_file")
    mode=$(stat -c '%a %U:%G' "$keys_file")
    # Group write or anything for others: the hashes are not secret, but who may add a key is.
    if (((8#${mode%% *}) & 8#027)); then
      result FAIL apikeys "$keys_file" "mode $mode: must be 0640 root:falcon or tighter"
    else
      result OK apikeys "$keys_file" "$count keys, mode $mode"
    fi
  fi
  [[ -n ${FALCON_API_KEY:-} && -n $port ]] || return
  (umask 077 && printf 'Authorization: Bearer %s\n' "$FALCON_API_KEY" >"$WORK/auth.header")
  code=$(curl -sS -m 5 -o "$WORK/infer.json" -D "$WORK/infer.headers" -w '%{http_code}' \
    "http://127.0.0.1:$port/infer" -H 'Content-Type: application/json' -H "@$WORK/auth.header" \
    -H "X-Request-ID: check-health-$(date +%s)" -d '{"text": "health check"}' 2>"$WORK/curl.err")
  if [[ $code == 200 ]]; then
    result OK apikeys "FALCON_API_KEY" "POST /infer on falcon-worker@$port: 200 as $(sed -nE 's/^[Xx]-[Cc]lient-[Kk]ey-[Ii]d: *([^[:space:]]+).*/\1/p' "$WORK/infer.headers")"
  else
    result FAIL apikeys "FALCON_API_KEY" "POST /infer on falcon-worker@$port: HTTP $code (401: the key is not in $keys_file, or the workers were not reloaded)"
  fi
}

run_checks() {
  local ports port
  LINES=()
  FAILED=0
  mapfile -t ports < <(worker_ports)
  check_units "${ports[@]}"
  for port in "${ports[@]}"; do
    check_readyz "$port"
    check_nginx_upstream "$port"
  done
  check_prometheus_targets "${ports[@]}"
  check_alerts
  check_backlog
  check_api_keys "${ports[0]:-}"
}

main() {
  case ${1:-} in
    --wait) WAIT_SECONDS=${2:?--wait needs a number of seconds} ;;
    "") ;;
    *) echo "usage: $0 [--wait SECONDS]" >&2; exit 2 ;;
  esac
  [[ $WAIT_SECONDS =~ ^[0-9]+$ ]] || { echo "--wait takes a number of seconds, got '$WAIT_SECONDS'" >&2; exit 2; }
  [[ $EUID -eq 0 ]] || { echo "run as root on the falcon-svc host (reads $ENV_FILE and the spool)" >&2; exit 2; }
  local deadline=$((SECONDS + WAIT_SECONDS))
  run_checks
  while ((FAILED > 0 && SECONDS < deadline)); do
    sleep 3
    run_checks
  done
  printf '%s\n' "${LINES[@]}"
  if ((FAILED > 0)); then
    echo "health: FAIL ($FAILED of ${#LINES[@]} checks failed)"
    exit 1
  fi
  echo "health: OK (${#LINES[@]} checks)"
}

main "$@"
