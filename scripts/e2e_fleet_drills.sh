#!/usr/bin/env bash
# The fleet's checks and drills (issue 15), run from the controller against the four hosts
# that scripts/e2e_fleet.sh booted and provisioned (docs/SCALING.md). Run as root.
#
#   scripts/e2e_fleet_drills.sh          every check and drill below, one PASS/FAIL line each,
#                                        then "VERDICT: PASS" (exit 0) or "VERDICT: FAIL" (exit 1)
#
# Load: scripts/faults/loadgen.py runs ON the load balancer against its own loopback
# (closed loop: the fleet's saturation), so every request crosses lb -> app host -> data
# host as a client's would; loopback is exempt from nginx's rate limits for the drills.
# Row accounting: every request carries X-Request-ID "<run>-<drill>-<n>"; the data host's
# request_log must hold exactly one row per answered request (none lost, none twice).
#
#   checks     every Prometheus target up with its host label; a client on the bridge
#              gets an answer through the load balancer's HTTPS
#   firewall   each host's nftables table is loaded; the flows of the roles connect, the
#              others time out (dropped, not refused)
#   tls        the app hosts' PostgreSQL and Redis connections are TLS (a cache hit across
#              app hosts); plain TCP is refused by both. Before the data drill: after a
#              Redis restart the app hosts' breakers stay open 60 s, and skip the cache.
#   power_off  app1 powered off mid-load: 0 failed; FalconAppHostDown fires for app1; app1
#              booted again replays what it served before it died (its write-ahead file)
#   deploy     ansible/deploy.yml rolls a configuration change across the app hosts
#              (serial: 1, every unit restarted) under load: 0 failed
#   data       PostgreSQL, then Redis restarted on the data host under load: 0 failed, rows
#              replayed exactly once
# Environment: E2E_FLEET_RUN_DIR (default /tmp/falcon-fleet), FLEET_DRILLS (default all of
# "checks firewall tls power_off deploy data"), LOAD_CONCURRENCY (default 8).
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# say, die, check, json_get, summary_line and verdict: the single-host drills' own.
# shellcheck source=faults/lib.sh
source "$REPO_DIR/scripts/faults/lib.sh"
# shellcheck disable=SC2034  # read by lib.sh's say
FAULT_NAME=fleet-drills
RUN_DIR=${E2E_FLEET_RUN_DIR:-/tmp/falcon-fleet}
KEY=$RUN_DIR/id_ed25519
INVENTORY=$RUN_DIR/inventory.ini
EXTRA_VARS=$RUN_DIR/extra-vars.yml
FLEET=$REPO_DIR/scripts/e2e_fleet.sh
ANSIBLE_PLAYBOOK=${ANSIBLE_PLAYBOOK:-$REPO_DIR/.venv-deploy/bin/ansible-playbook}
LOAD_CONCURRENCY=${LOAD_CONCURRENCY:-8}
read -r -a DRILLS <<<"${FLEET_DRILLS:-checks firewall tls power_off deploy data}"
RUN_ID=fleet-$(date +%s)
WORK=$RUN_DIR/drills
# Where FalconAppHostDown must be firing by: scrape timeout 10 s + up to 15 s to the scrape
# and 15 s to the evaluation + `for: 1m` = 100 s at worst (prometheus/rules/falcon_alerts.yml).
ALERT_WAIT_SECONDS=150

[[ -f $INVENTORY && -f $EXTRA_VARS ]] || die "no provisioned fleet in $RUN_DIR: run scripts/e2e_fleet.sh up and provision"
declare -A ADDRESS=()
while read -r name address; do ADDRESS[$name]=$address; done < <(
  sed -nE 's/^([a-z0-9]+) ansible_host=([0-9.]+) .*/\1 \2/p' "$INVENTORY")
[[ -n ${ADDRESS[lb]:-} && -n ${ADDRESS[app1]:-} && -n ${ADDRESS[app2]:-} && -n ${ADDRESS[data]:-} ]] \
  || die "the inventory $INVENTORY does not name lb, app1, app2 and data"
API_KEY=$(sed -nE 's/^vault_falcon_svc_e2e_api_key: "(.*)"$/\1/p' "$EXTRA_VARS")

ssh_host() {
  local host=$1
  shift
  ssh -i "$KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
    -o ConnectTimeout=5 -o BatchMode=yes "root@${ADDRESS[$host]}" "$@"
}

psql_data() { ssh_host data "cd / && runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -d falcon -c \"$1\""; }

# prom QUERY: the instant vector's samples, one "labels value" line each (data's Prometheus).
prom() {
  ssh_host data "curl -fsS -m 5 http://127.0.0.1:9090/api/v1/query --data-urlencode $(printf '%q' "query=$1")" \
    | python3 -c '
import json, sys
for sample in json.load(sys.stdin)["data"]["result"]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(sample["metric"].items()) if k != "__name__")
    print(labels, sample["value"][1])'
}

# --- load, on the load balancer -------------------------------------------------------

prepare_load() {
  mkdir -p "$WORK"
  scp -q -i "$KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
    "$REPO_DIR/scripts/faults/loadgen.py" "root@${ADDRESS[lb]}:/root/falcon-loadgen.py"
  # The key through a 0600 file, never a command line (ps shows those to every user).
  printf '%s' "$API_KEY" | ssh_host lb 'umask 077 && cat >/root/falcon-e2e-api-key'
  # Loopback exempt from the rate limits for the drills (what scripts/faults/lib.sh does on
  # one host); the nginx role writes the file back on its next run.
  ssh_host lb 'printf "# the fleet drills (scripts/e2e_fleet_drills.sh)\n127.0.0.1 1;\n::1 1;\n" >/etc/nginx/falcon-svc-unlimited.conf && systemctl reload nginx && sleep 1'
}

# load_start TAG SECONDS: closed-loop load on lb's loopback for at most SECONDS.
load_start() {
  local tag=$1 seconds=$2
  ssh_host lb "rm -f /root/$tag.json /root/$tag.stop /root/$tag.err /root/$tag.answered; FALCON_API_KEY=\$(cat /root/falcon-e2e-api-key) \
    nohup python3 /root/falcon-loadgen.py --url http://127.0.0.1 --run-id $RUN_ID-$tag --duration $seconds \
    --rate 0 --concurrency $LOAD_CONCURRENCY --timeout 30 --stop-file /root/$tag.stop --out /root/$tag.json \
    --answered /root/$tag.answered \
    >/dev/null 2>/root/$tag.err </dev/null &"
  say "load $tag: closed loop on $LOAD_CONCURRENCY connections through lb, up to $seconds s"
}

# load_wait TAG [stop]: wait for the load's summary (ending it first with "stop"); it is
# copied to WORK/TAG.json and summarised.
load_wait() {
  local tag=$1
  [[ ${2:-} == stop ]] && ssh_host lb "touch /root/$tag.stop"
  for _ in $(seq 1 400); do
    if ssh_host lb "test -s /root/$tag.json" 2>/dev/null; then
      ssh_host lb "cat /root/$tag.json" >"$WORK/$tag.json"
      say "load $tag: $(summary_line "$WORK/$tag.json")"
      return 0
    fi
    sleep 1
  done
  ssh_host lb "cat /root/$tag.err" >&2 || true
  die "load $tag gave no summary"
}

check_no_failed() {
  local file=$WORK/$1.json sent bad errors
  sent=$(json_get "$file" sent) bad=$(json_get "$file" non_2xx) errors=$(json_get "$file" errors)
  check "$1: every request answered 2xx ($sent sent, $bad non-2xx, $errors connection errors)" \
    test "$sent" -gt 0 -a "$bad" -eq 0 -a "$errors" -eq 0
}

# check_rows TAG: one request_log row per answered request of the load TAG, on the data
# host, matched by request id (the load balancer's list of 2xx answers against the rows),
# waited for up to 180 s: rows arrive from the app hosts' background writers, and after an
# outage from their write-ahead files and spools. A request nginx passed to a second host
# (the first died with it) is still one row: nginx sends the same X-Falcon-Proxy-Request
# on every try, the row's key, and PostgreSQL keeps the first of two (ON CONFLICT DO NOTHING).
check_rows() {
  local tag=$1 expected rows=0 i result
  expected=$(json_get "$WORK/$tag.json" ok)
  scp -q -i "$KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
    "root@${ADDRESS[lb]}:/root/$tag.answered" "$WORK/$tag.answered" || : >"$WORK/$tag.answered"
  for ((i = 0; i < 180; i++)); do
    rows=$(psql_data "SELECT count(DISTINCT request_id) FROM request_log
      WHERE starts_with(request_id, '$RUN_ID-$tag-') AND received_at > now() - interval '1 hour'" || echo 0)
    ((rows >= expected)) && break
    sleep 1
  done
  psql_data "COPY (SELECT request_id, split_part(worker_id, '-', 1) FROM request_log
    WHERE starts_with(request_id, '$RUN_ID-$tag-') AND received_at > now() - interval '1 hour') TO STDOUT" \
    >"$WORK/$tag.rows" || : >"$WORK/$tag.rows"
  result=$(python3 - "$WORK/$tag.answered" "$WORK/$tag.rows" <<'EOF2'
import collections, sys
answered = set(open(sys.argv[1]).read().split())
hosts = collections.defaultdict(list)
for line in open(sys.argv[2]):
    request_id, host = line.split()
    hosts[request_id].append(host)
lost = answered - hosts.keys()
twice = [r for r, h in hosts.items() if len(h) > 1]
unanswered = hosts.keys() - answered
by_host = collections.Counter(h for hs in hosts.values() for h in hs)
print(len(answered), sum(map(len, hosts.values())), len(lost), len(twice), len(unanswered),
      ",".join(f"{h}:{n}" for h, n in sorted(by_host.items())) or "none")
EOF2
  )
  local answered total lost twice unanswered by_host
  read -r answered total lost twice unanswered by_host <<<"$result"
  say "$tag: $answered answered requests, $total request_log rows (after $i s; by host $by_host): lost $lost, twice $twice, rows of unanswered requests $unanswered"
  check "$tag: the load balancer answered every request it was sent ($answered = $expected 2xx)" test "$answered" -eq "$expected"
  check "$tag: no row lost ($lost of $answered answered requests without a row)" test "$lost" -eq 0
  check "$tag: no row twice ($twice request ids with two rows)" test "$twice" -eq 0
  check "$tag: no row for a request never answered ($unanswered)" test "$unanswered" -eq 0
  printf '%s\t%s\t%s\t%s\t%s\n' "$tag" "$answered" "$lost" "$twice" "$unanswered" >>"$WORK/accounting.tsv"
}

# rows_of_host TAG HOST: rows of the load TAG written by HOST's units.
rows_of_host() {
  psql_data "SELECT count(*) FROM request_log WHERE starts_with(request_id, '$RUN_ID-$1-')
    AND split_part(worker_id, '-', 1) = '$2' AND received_at > now() - interval '1 hour'"
}

# units_ready HOST: both worker units of HOST answer /readyz on its private address.
units_ready() {
  local port
  for port in 8001 8002; do
    ssh_host "$1" "curl -fsS -o /dev/null -m 2 http://${ADDRESS[$1]}:$port/readyz" 2>/dev/null || return 1
  done
}

wait_units_ready() {
  for _ in $(seq 1 120); do
    units_ready "$1" && return 0
    sleep 1
  done
  return 1
}

# --- the drills -------------------------------------------------------------------------

drill_checks() {
  local up expected=12 n
  # 4 units, 4 node exporters, nginx, redis and postgres exporters, Prometheus itself.
  for _ in $(seq 1 60); do
    up=$(prom 'up == 1' | wc -l) || up=0
    ((up >= expected)) && break
    sleep 2
  done
  prom 'up' | sed 's/^/    /'
  check "every Prometheus target is up ($up of $expected)" test "$up" -eq "$expected"
  for n in lb app1 app2 data; do
    check "node exporter of $n scraped with host=$n" test "$(prom "up{job=\"node\",host=\"$n\"} == 1" | wc -l)" -eq 1
  done
  check "both units of app1 and of app2 scraped with their host label" \
    test "$(prom 'count by (host) (up{job="falcon"} == 1) == 2' | wc -l)" -eq 2
  local code
  code=$(printf 'header = "Authorization: Bearer %s"\n' "$API_KEY" | curl -sk -o "$WORK/through-lb.json" -w '%{http_code}' \
    -m 10 -K - -H 'Content-Type: application/json' -d '{"text": "The fleet answers from across the bridge."}' \
    "https://${ADDRESS[lb]}/infer") || true
  check "a client on the bridge gets 200 from https://${ADDRESS[lb]}/infer ($code: $(head -c 160 "$WORK/through-lb.json"))" \
    test "$code" = 200
}

# The app hosts reach PostgreSQL and Redis over TLS only (scripts/e2e_fleet.sh gives the data
# host a certificate): every connection of the writer role from off the data host is TLS, a
# plain-TCP client is refused by both, and an answer app1 cached is a hit on app2: it went
# through Redis, whose only port speaks TLS.
drill_tls() {
  local sessions plain rc=0
  sessions=$(psql_data "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
    FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
    WHERE a.usename = 'falcon' AND a.client_addr IS NOT NULL AND a.client_addr <> '127.0.0.1'")
  check "PostgreSQL: the app hosts' connections are TLS (tls|plain: $sessions)" \
    python3 -c 'import sys; tls, plain = map(int, sys.argv[1].split("|")); sys.exit(not (tls > 0 and plain == 0))' "$sessions"
  # pg_hba refuses before any password is asked: no password needed to see it.
  plain=$(ssh_host app1 "/opt/falcon-svc/venv/bin/python -c 'import psycopg; psycopg.connect(\"host=${ADDRESS[data]} dbname=falcon user=falcon sslmode=disable connect_timeout=5\")' 2>&1" || true)
  check "PostgreSQL: a plain-TCP login from app1 is refused ($(grep -o 'no pg_hba.conf entry.*' <<<"$plain" | head -1))" \
    grep -q 'no pg_hba.conf entry.*no encryption' <<<"$plain"
  # Without TLS the connection itself fails ("Error: ..."); with TLS, Redis answers (NOAUTH:
  # the default user is off), which shows the handshake and the certificate are good.
  plain=$(ssh_host data "timeout 5 redis-cli -h ${ADDRESS[data]} PING 2>&1" || rc=$?)
  check "Redis: a plain-TCP PING fails at the connection (exit $rc: ${plain//$'\n'/ })" \
    grep -q '^Error: ' <<<"$plain"
  plain=$(ssh_host data "timeout 5 redis-cli --tls --cacert /etc/redis/tls/ca.crt -h ${ADDRESS[data]} PING 2>&1" || true)
  check "Redis: a TLS PING verified against the CA gets Redis's answer (${plain//$'\n'/ })" grep -q NOAUTH <<<"$plain"
  check "the retention job runs on app1 against the data host's PostgreSQL over TLS" \
    ssh_host app1 'systemctl start falcon-svc-retention.service'
  # Over CACHE_REDIS_MIN_CHARS (256), so the answer is cached in Redis, not only in a worker.
  local text="TLS drill $RUN_ID: the staff were friendly and the room was clean. " first second
  text=$text$text$text$text$text
  first=$(infer_on app1 "$text")
  sleep 2  # the cache writes from a background thread
  second=$(infer_on app2 "$text")
  check "Redis: app1's answer cached over TLS is a hit on app2 (app1 cache_hit=$(json_field "$first" cache_hit), app2 cache_hit=$(json_field "$second" cache_hit))" \
    test "$(json_field "$first" cache_hit)/$(json_field "$second" cache_hit)" = False/True
}

# infer_on HOST TEXT: the JSON answer of HOST's first unit, asked from the load balancer (the
# firewall lets only it and the monitoring host reach a worker).
infer_on() {
  local body
  body=$(python3 -c 'import json, sys; print(json.dumps({"text": sys.argv[1]}))' "$2")
  printf 'header = "Authorization: Bearer %s"\n' "$API_KEY" | ssh_host lb \
    "curl -sS -m 10 -K - -H 'Content-Type: application/json' -d $(printf '%q' "$body") http://${ADDRESS[$1]}:8001/infer" || true
}

# json_field JSON KEY: the value of KEY (Python's repr), or "none" when JSON is not an object with it.
json_field() { python3 -c 'import json, sys
try: print(json.loads(sys.argv[1])[sys.argv[2]])
except Exception: print("none")' "$1" "$2"; }

# connect FROM ADDRESS PORT: the exit status of a 3 s TCP connect from host FROM (124: timed
# out, the firewall dropped it; 1: refused).
connect() {
  local rc=0
  ssh_host "$1" "timeout 3 bash -c '</dev/tcp/$2/$3'" 2>/dev/null || rc=$?
  echo "$rc"
}

flow_open() { check "firewall: $1 -> $2:$3 ($4) connects" test "$(connect "$1" "${ADDRESS[$2]}" "$3")" -eq 0; }
flow_dropped() {
  local rc
  rc=$(connect "$1" "${ADDRESS[$2]}" "$3")
  check "firewall: $1 -> $2:$3 ($4) is dropped (exit $rc; 124 = timed out)" test "$rc" -eq 124
}

drill_firewall() {
  local n
  for n in lb app1 app2 data; do
    check "firewall: $n has its nftables table loaded (falcon-firewall.service active)" \
      ssh_host "$n" 'nft list table inet falcon_firewall >/dev/null && systemctl is-active --quiet falcon-firewall.service'
  done
  flow_open app1 data 5432 "PostgreSQL from an app host"
  flow_open app2 data 6379 "Redis from an app host"
  flow_open lb app1 8001 "a worker from the load balancer"
  flow_open data app2 8002 "a worker's /metrics from the monitoring host"
  flow_open data lb 9113 "the nginx exporter from the monitoring host"
  flow_dropped lb data 5432 "PostgreSQL from the load balancer: no role needs it"
  flow_dropped lb data 6379 "Redis from the load balancer"
  flow_dropped app2 app1 8001 "a worker from another app host"
  flow_dropped app1 lb 9100 "the node exporter from an app host"
  flow_dropped lb data 9187 "the postgres exporter from the load balancer"
  local rc=0
  timeout 3 bash -c "</dev/tcp/${ADDRESS[data]}/5432" 2>/dev/null || rc=$?
  check "firewall: this controller (on the bridge, no role) -> data:5432 is dropped (exit $rc)" test "$rc" -eq 124
}

drill_power_off() {
  local before_app1 after_app1 fired=0 off_at
  load_start power_off 60
  sleep 15
  say "powering off app1 (its link down, then SIGKILL of its nspawn: no shutdown, no drain)"
  off_at=$(date +%s)
  bash "$FLEET" power-off app1
  load_wait power_off
  check_no_failed power_off
  while (($(date +%s) - off_at < ALERT_WAIT_SECONDS)); do
    if [[ -n $(prom 'ALERTS{alertname="FalconAppHostDown",alertstate="firing",host="app1"}') ]]; then
      fired=1
      break
    fi
    sleep 2
  done
  say "FalconAppHostDown: $(prom 'ALERTS{alertname="FalconAppHostDown"}' | tr '\n' ';')"
  check "FalconAppHostDown fires for host=app1 ($(($(date +%s) - off_at)) s after the power-off; at most $ALERT_WAIT_SECONDS)" \
    test "$fired" -eq 1
  before_app1=$(rows_of_host power_off app1 || echo unknown)
  bash "$FLEET" start app1
  check "app1 booted again: both units ready" wait_units_ready app1
  check "app1's firewall is loaded again at boot" ssh_host app1 'nft list table inet falcon_firewall >/dev/null'
  check_rows power_off
  after_app1=$(rows_of_host power_off app1 || echo 0)
  say "power_off: rows of requests app1 served: $before_app1 in PostgreSQL while it was off, $after_app1 after its restart (its write-ahead files replayed)"
  check "power_off: app1 served part of the load before it died ($after_app1 rows)" test "$after_app1" -gt 0
}

unit_pids() {
  local n
  for n in app1 app2; do
    # shellcheck disable=SC2016  # $p expands on the host
    ssh_host "$n" 'for p in 8001 8002; do systemctl show -p MainPID --value falcon-worker@$p; done' | tr '\n' ' '
  done
}

drill_deploy() {
  local pids_before rc=0 start
  pids_before=$(unit_pids)
  load_start deploy 600
  sleep 10
  start=$(date +%s)
  # A configuration change every unit must restart for (the env file): the rolling deploy
  # restarts each app host's units one by one, one host at a time.
  (cd "$REPO_DIR/ansible" && "$ANSIBLE_PLAYBOOK" -i "$INVENTORY" -e "@$EXTRA_VARS" \
    -e '{"falcon_svc_env_overrides": {"CACHE_TTL_SECONDS": "1800"}}' deploy.yml) >"$WORK/deploy.log" 2>&1 || rc=$?
  say "deploy.yml: exit $rc after $(($(date +%s) - start)) s: $(grep -E '^(app1|app2) +:' "$WORK/deploy.log" | tr -s ' ' | tr '\n' ';')"
  sleep 5
  load_wait deploy stop
  check "deploy.yml succeeded (exit $rc)" test "$rc" -eq 0
  ((rc == 0)) || grep -E -A10 '^(fatal|failed):' "$WORK/deploy.log" | head -40 || true
  check "every unit of app1 and app2 has a new main pid ($pids_before-> $(unit_pids))" \
    python3 -c 'import sys; a, b = sys.argv[1].split(), sys.argv[2].split(); sys.exit(not (len(a) == len(b) == 4 and not set(a) & set(b)))' \
    "$pids_before" "$(unit_pids)"
  check_no_failed deploy
  check_rows deploy
}

drill_data() {
  load_start data 120
  sleep 15
  say "restarting PostgreSQL on the data host"
  ssh_host data 'systemctl restart postgresql@15-main'
  sleep 15
  say "restarting Redis on the data host"
  ssh_host data 'systemctl restart redis-server'
  sleep 15
  load_wait data stop
  check_no_failed data
  check_rows data
}

main() {
  local drill
  say "run id $RUN_ID; drills: ${DRILLS[*]}"
  prepare_load
  for drill in "${DRILLS[@]}"; do
    say "== $drill"
    "drill_$drill"
  done
  verdict
}

main
