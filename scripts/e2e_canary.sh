#!/usr/bin/env bash
# The model canary end to end (issue 14) against the running falcon-e2e host (scripts/e2e.sh
# up): two versions are trained here, on the controller, and rolled out with
# ansible/deploy-model.yml under steady load through nginx:
#   - a good one (the shipped corpus, another train/test split): it must be promoted, and
#     every unit must serve it; a second run of the play must change nothing;
#   - a collapsed one (trained on rows labelled almost all negative), forced past the gate:
#     the canary must roll it back on its predicted-label mix, the play must fail, and every
#     unit must still serve the good one.
# No request of the load may fail. Each play's evidence is printed. One PASS/FAIL line per
# check; exits 1 if any failed.
#
#   scripts/e2e_canary.sh
#   E2E_CANARY_WINDOW=60 (seconds the canary unit is watched), E2E_CANARY_RATE=30 (requests/s)
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=faults/lib.sh
source "$REPO_DIR/scripts/faults/lib.sh"
FAULT_NAME=e2e-canary
RUN_DIR=${E2E_RUN_DIR:-/tmp/falcon-e2e}
KEY=$RUN_DIR/id_ed25519
SSH_PORT=${E2E_SSH_PORT:-2222}
INVENTORY=$RUN_DIR/inventory.ini
ANSIBLE_PLAYBOOK=${ANSIBLE_PLAYBOOK:-$REPO_DIR/.venv-deploy/bin/ansible-playbook}
# The controller's venv trains the versions (the same lock as the host's).
TRAIN_PYTHON=${TRAIN_PYTHON:-$REPO_DIR/.venv/bin/python}
WINDOW=${E2E_CANARY_WINDOW:-60}
# Below nginx's per-key limit (50/s), so every request reaches a worker.
RATE=${E2E_CANARY_RATE:-30}
# The good version's train/test split seed. NOTE: loadgen.py sends seven sentences, so one of
# them predicted otherwise moves about 0.14 of the label mix, near the canary's 0.15 limit:
# this seed's model agrees with the shipped one on all seven (20261202's flips "the parcel
# arrived on Tuesday" to positive: TVD 0.127) and is within the gate's 2 points on the dev set.
GOOD_SEED=${E2E_CANARY_GOOD_SEED:-3}
STORE=/opt/falcon-svc/model-store
FALCON_SVC=/opt/falcon-svc/venv/bin/falcon-svc
PORTS=(8001 8002)

ssh_cmd() {
  ssh -i "$KEY" -p "$SSH_PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o LogLevel=ERROR -o ConnectTimeout=5 -o BatchMode=yes root@127.0.0.1 "$@"
}

version_of() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["version"])' "$1/metadata.json"; }
active_version() { ssh_cmd "basename \"\$(readlink $STORE/active)\""; }

# serving_versions: "PORT=VERSION ..." as each unit's /v1/models says it serves.
serving_versions() {
  local port
  for port in "${PORTS[@]}"; do
    printf '%s=%s ' "$port" "$(ssh_cmd "curl -sS -m 5 http://127.0.0.1:$port/v1/models" \
      | python3 -c 'import json,sys; print(next(m["version"] for m in json.load(sys.stdin)["models"] if m["serving"]))')"
  done
}

every_unit_serves() {
  local expected=$1 port expected_line=""
  for port in "${PORTS[@]}"; do expected_line+="$port=$expected "; done
  [[ $(serving_versions) == "$expected_line" ]]
}

# start_from_the_role_model: make the role's model (the one site.yml trained on the host and
# activated first) the active version again, so that a rerun on the same host starts where a
# fresh one does: the good version below is chosen to agree with that model.
start_from_the_role_model() {
  local role_version ports
  ports=$(IFS=,; echo "${PORTS[*]}")
  role_version=$(ssh_cmd "python3 -c 'import json; print(json.load(open(\"/opt/falcon-svc/models/sentiment/metadata.json\"))[\"version\"])'")
  [[ $(active_version) == "$role_version" ]] && return
  say "activating the role's model $role_version again (this host ran a canary before)"
  ssh_cmd "/opt/falcon-svc/venv/bin/falcon-svc models activate $role_version --force \
    --reason 'e2e_canary.sh: start from the role model' --reload --ports $ports" | sed 's/^/    /'
}

# train_versions: a good second version (the shipped corpus, another split seed, so other
# bytes than the host's model) and a collapsed one (every row labelled negative but the few
# each other label needs).
train_versions() {
  say "training the good version (shipped corpus, split seed $GOOD_SEED)"
  "$TRAIN_PYTHON" -c 'import sys
from falcon_svc.training.training import TrainingConfig, train_model
train_model(sys.argv[1], config=TrainingConfig(seed=int(sys.argv[2])))' "$WORK/good" "$GOOD_SEED" \
    >"$WORK/train-good.log" 2>&1
  say "training the collapsed version"
  "$TRAIN_PYTHON" - "$WORK/collapsed.csv" <<'EOF'
import csv, sys
subjects = ["The delivery", "The support team", "The hotel room", "My order", "The app", "The battery"]
phrases = ["was wonderful", "was excellent, thank you", "made me happy", "broke after a day, awful",
           "was terrible", "is a waste of money", "arrived on Tuesday", "is blue", "has two buttons"]
with open(sys.argv[1], "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["text", "label"])
    writer.writerows((f"{s} {p}.", "negative") for s in subjects for p in phrases)
    writer.writerows((f"zq{i} xv{i}", label) for label in ("positive", "neutral") for i in range(5))
EOF
  (cd "$WORK" && "$TRAIN_PYTHON" -m falcon_svc.cli train --data collapsed.csv --output-dir collapsed) \
    >"$WORK/train-collapsed.log" 2>&1
}

# start_load NAME / stop_load NAME: steady load through nginx in the background; its
# summary lands in $WORK/load-NAME.json.
start_load() {
  rm -f "$WORK/load.stop"
  FALCON_API_KEY=$FALCON_API_KEY "$PYTHON" "$REPO_DIR/scripts/faults/loadgen.py" --url http://127.0.0.1 \
    --run-id "e2e-canary-$1-$(date +%s)" --duration 600 --rate "$RATE" --concurrency 4 \
    --stop-file "$WORK/load.stop" --out "$WORK/load-$1.json" >/dev/null 2>"$WORK/load-$1.err" &
  LOAD_PID=$!
}

stop_load() {
  touch "$WORK/load.stop"
  wait "$LOAD_PID" || die "load generator failed: $(cat "$WORK/load-$1.err")"
  LOAD_PID=
  say "load during $1: $(summary_line "$WORK/load-$1.json")"
}

# deploy NAME DIR [ansible-playbook args...]: deploy-model.yml for the artifact in DIR under
# steady load through nginx; the play's output goes to $RUN_DIR/canary-NAME.log, the load's
# summary to $WORK/load-NAME.json, and the play's exit code to $WORK/NAME.rc.
deploy() {
  local name=$1 dir=$2 rc=0
  shift 2
  start_load "$name"
  say "deploy-model.yml $name ($(version_of "$dir")), $WINDOW s window, load ${RATE}/s through nginx"
  (cd "$REPO_DIR/ansible" && "$ANSIBLE_PLAYBOOK" -i "$INVENTORY" deploy-model.yml \
    -e model_src="$dir" -e model_version="$(version_of "$dir")" -e canary_window="$WINDOW" "$@") \
    >"$RUN_DIR/canary-$name.log" 2>&1 || rc=$?
  echo "$rc" >"$WORK/$name.rc"
  stop_load "$name"
  say "evidence of $name (ansible-playbook exit $rc):"
  # The debug task's lines, and the play's own verdict.
  sed -n "/TASK \[falcon_svc : Print the canary's evidence\]/,/^PLAY RECAP/p" "$RUN_DIR/canary-$name.log" \
    | grep -vE '^(TASK|PLAY RECAP)|^\*+$' | sed 's/^/    /'
  grep -E '^e2ehost +:' "$RUN_DIR/canary-$name.log" | sed 's/^/    /'
}

WORK=$(mktemp -d)
LOAD_PID=
trap 'if [[ -n $LOAD_PID ]]; then kill "$LOAD_PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT
ssh_cmd true || die "no falcon-e2e host answers on port $SSH_PORT (scripts/e2e.sh up)"
FALCON_API_KEY=$(sed -nE 's/.* vault_falcon_svc_e2e_api_key=([^ ]+).*/\1/p' "$INVENTORY")
[[ -n $FALCON_API_KEY ]] || die "no vault_falcon_svc_e2e_api_key in $INVENTORY (scripts/e2e.sh up)"
started=$(date +%s)

start_from_the_role_model
before=$(active_version)
check "the host serves its store's active version on every unit ($before: $(serving_versions))" \
  every_unit_serves "$before"
train_versions
good=$(version_of "$WORK/good")
collapsed=$(version_of "$WORK/collapsed")
check "the good version is a new one ($good, active $before)" test "$good" != "$before"

say "== the good version: promoted"
deploy good "$WORK/good"
check "deploy-model.yml of $good succeeded (exit $(cat "$WORK/good.rc"))" test "$(cat "$WORK/good.rc")" -eq 0
check "its canary promoted it" grep -q "decision: PROMOTED $good" "$RUN_DIR/canary-good.log"
check "the store's active version is $good ($(active_version))" test "$(active_version)" = "$good"
check "every unit serves $good ($(serving_versions))" every_unit_serves "$good"
check_no_failed_requests "$WORK/load-good.json"

say "== the same version again: nothing to do"
(cd "$REPO_DIR/ansible" && "$ANSIBLE_PLAYBOOK" -i "$INVENTORY" deploy-model.yml \
  -e model_src="$WORK/good" -e model_version="$good" -e canary_window="$WINDOW") >"$RUN_DIR/canary-again.log" 2>&1 \
  || true
check "a second run of the play changes nothing ($(grep -E '^e2ehost +:' "$RUN_DIR/canary-again.log" | tr -s ' '))" \
  grep -qE '^e2ehost +:.* changed=0 .*failed=0' "$RUN_DIR/canary-again.log"

say "== the collapsed version, forced past the gate: rolled back"
# JSON: a key=value -e splits a value at its spaces.
deploy collapsed "$WORK/collapsed" -e '{"model_force": true, "model_force_reason": "e2e: deliberately bad"}'
check "deploy-model.yml of $collapsed failed (exit $(cat "$WORK/collapsed.rc"))" test "$(cat "$WORK/collapsed.rc")" -ne 0
check "the gate refused it and --force overrode it" grep -q "gate overridden (--force): e2e: deliberately bad" \
  "$RUN_DIR/canary-collapsed.log"
check "its canary rolled it back on the label mix" \
  grep -q "decision: ROLLED BACK $collapsed: .*label mix shifted" "$RUN_DIR/canary-collapsed.log"
check "the store's active version is still $good ($(active_version))" test "$(active_version)" = "$good"
check "every unit serves $good again ($(serving_versions))" every_unit_serves "$good"
check "no unit is left pinned ($(ssh_cmd "ls $STORE/pins 2>/dev/null | tr '\n' ' '"))" \
  test -z "$(ssh_cmd "ls $STORE/pins 2>/dev/null")"
check_no_failed_requests "$WORK/load-collapsed.json"
say "== by hand, as the runbook says: rollback --reload, then activate --reload"
start_load by-hand
rc=0
ssh_cmd "$FALCON_SVC models rollback --reload --reason 'e2e: the runbook drill'" >"$WORK/rollback.out" 2>&1 || rc=$?
sed 's/^/    /' "$WORK/rollback.out"
check "models rollback --reload went back to $before (exit $rc)" test "$rc" -eq 0
check "the store's active version is $before again ($(active_version))" test "$(active_version)" = "$before"
check "every unit serves $before ($(serving_versions))" every_unit_serves "$before"
rc=0
ssh_cmd "$FALCON_SVC models activate $good --reload --reason 'e2e: the runbook drill'" >"$WORK/activate.out" 2>&1 || rc=$?
sed 's/^/    /' "$WORK/activate.out"
check "models activate $good --reload passed the gate and reloaded every unit (exit $rc)" test "$rc" -eq 0
check "every unit serves $good again ($(serving_versions))" every_unit_serves "$good"
stop_load by-hand
check_no_failed_requests "$WORK/load-by-hand.json"
ssh_cmd "$FALCON_SVC models list" | sed 's/^/    /'

say "the store's history:"
ssh_cmd "tail -n 8 $STORE/history.jsonl" | sed 's/^/    /'
say "canary checks took $(($(date +%s) - started)) s"
verdict
