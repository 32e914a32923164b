#!/usr/bin/env bash
# Failure injection: stop Redis under load, start it again. Run on the falcon-svc
# host as root. Expect: no failed request (cache and idempotency fall back: requests
# with X-Idempotency-Key get `Idempotency-Status: unavailable`), the Redis circuit
# breaker opens (falcon_circuit_breaker_transitions_total), one request_log row per
# request, and after Redis is back the breaker half-opens (60 s) and closes.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

fault_init redis_down
require_ready_workers 1
REDIS_UNIT=${REDIS_UNIT:-redis-server.service}
RECOVERY_SECONDS=${RECOVERY_SECONDS:-150}
on_exit systemctl start "$REDIS_UNIT"
opened_before=$(metric_total 'falcon_circuit_breaker_transitions_total[{].*dependency="redis".*to_state="open"')

load_start 30
sleep 6
say "systemctl stop $REDIS_UNIT"
systemctl stop "$REDIS_UNIT"
sleep 14
say "systemctl start $REDIS_UNIT"
systemctl start "$REDIS_UNIT"
load_wait

unavailable=$(json_get "$WORK/load.json" idempotency_status.unavailable)
opened_after=$(metric_total 'falcon_circuit_breaker_transitions_total[{].*dependency="redis".*to_state="open"')
check_no_failed_requests
check "the idempotency fallback was visible ($unavailable responses with Idempotency-Status: unavailable)" \
  test "$unavailable" -gt 0
check "the Redis breaker opened (open transitions $opened_before -> $opened_after)" \
  test "$opened_after" -gt "$opened_before"
check_rows "$(json_get "$WORK/load.json" ok)"

# Recovery: every worker process's breaker half-opens after its timeout and closes
# on the first success. Ten idempotent requests in a row must get through Redis.
say "waiting for recovery (breaker timeout), up to $RECOVERY_SECONDS s"
recovered_after=
streak=0
started=$(date +%s)
while (($(date +%s) - started < RECOVERY_SECONDS)); do
  headers=$(curl -sS -m 5 -D - -o /dev/null "$FALCON_URL/infer" -H 'Content-Type: application/json' "${AUTH_CURL[@]}" \
    -H "X-Request-ID: $RUN_ID-recovery-$RANDOM$RANDOM" -H "X-Idempotency-Key: $RUN_ID-$RANDOM$RANDOM" \
    -d '{"text": "checking that the cache is back"}' || true)
  if grep -q '^HTTP/1.1 200' <<<"$headers" && ! grep -qi '^idempotency-status: unavailable' <<<"$headers"; then
    streak=$((streak + 1))
    if ((streak >= 10)); then recovered_after=$(($(date +%s) - started)); break; fi
  else
    streak=0
  fi
  sleep 0.5
done
check "Redis used again after recovery (${recovered_after:-not within $RECOVERY_SECONDS} s after the load)" \
  test -n "$recovered_after"
verdict
