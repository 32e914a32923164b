#!/usr/bin/env bash
# End-to-end host for the Ansible roles: a Debian 12 systemd-nspawn container
# (recipe: docs/SYSTEMD_HOST.md). Run as root.
#
#   scripts/e2e.sh up         boot a fresh host and provision it with ansible/site.yml;
#                             leave it running and print the ssh command and nginx URL
#   scripts/e2e.sh provision  run ansible/site.yml again on the running host
#   scripts/e2e.sh down       stop it (kill -TERM nspawn) and remove the run copy
#   scripts/e2e.sh test       boot, provision, provision again (must report changed=0),
#                             scripts/e2e_checks.sh; the host is always shut down
#   scripts/e2e.sh pristine   build the cached pristine root (debootstrap) unless it is there;
#                             scripts/e2e_fleet.sh builds its hosts' roots from it
#
# The host shares this machine's network namespace, so the service ports below must
# be free before booting. Environment:
#   E2E_CACHE_DIR  pristine rootfs cache (default /var/cache/falcon-e2e)
#   E2E_RUN_DIR    per-run state: rootfs copy, key, inventory, logs (default /tmp/falcon-e2e)
#   E2E_KEEP=1     `test` leaves the host running
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${E2E_CACHE_DIR:-/var/cache/falcon-e2e}
PRISTINE=$CACHE_DIR/rootfs-pristine
RUN_DIR=${E2E_RUN_DIR:-/tmp/falcon-e2e}
ROOTFS=$RUN_DIR/rootfs
KEY=$RUN_DIR/id_ed25519
LOG=$RUN_DIR/nspawn.log
PIDFILE=$RUN_DIR/nspawn.pid
INVENTORY=$RUN_DIR/inventory.ini
SSH_PORT=2222
MACHINE=falcon-e2e
# Every port the provisioned host listens on (ss -ltn there): nginx 80 and 443 and its status
# 8080, Redis, PostgreSQL, the two workers, Prometheus, Alertmanager (its cluster port
# 9094 is off), the four exporters, and ssh. No Grafana 3000: the package is not
# installed here. The docs (UBUNTU_DEPLOYMENT.md) list the same; tests/ops/test_docs.py checks it.
PORTS=(80 443 5432 6379 8001 8002 8080 9090 9093 9100 9113 9121 9187 "$SSH_PORT")
ANSIBLE_PLAYBOOK=${ANSIBLE_PLAYBOOK:-$REPO_DIR/.venv-deploy/bin/ansible-playbook}
PACKAGES=systemd,systemd-sysv,dbus,openssh-server,python3,python3-apt,sudo,ca-certificates,iproute2,procps,curl

log() { printf '[e2e %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ssh_cmd() {
  ssh -i "$KEY" -p "$SSH_PORT" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o LogLevel=ERROR -o ConnectTimeout=3 -o BatchMode=yes root@127.0.0.1 "$@"
}

nspawn_pid() {
  local pid
  [[ -f $PIDFILE ]] || return 1
  pid=$(cat "$PIDFILE")
  [[ -n $pid && -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == systemd-nspawn ]] \
    && echo "$pid"
}

require_tools() {
  local missing=()
  [[ $EUID -eq 0 ]] || die "run as root: debootstrap and systemd-nspawn need it"
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
  command -v ssh >/dev/null || missing+=(openssh-client)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get install -y "${missing[@]}" >/dev/null
  fi
}

check_ports_free() {
  local port busy=()
  for port in "${PORTS[@]}"; do
    if ss -Hltn "sport = :$port" | grep -q .; then busy+=("$port"); fi
  done
  ((${#busy[@]} == 0)) || { ss -ltnp; die "ports already in use: ${busy[*]}"; }
}

ensure_pristine() {
  if [[ -x $PRISTINE/usr/sbin/sshd && -x $PRISTINE/lib/systemd/systemd ]]; then
    log "reusing pristine rootfs $PRISTINE"
    return
  fi
  local mirror start
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  [[ -n $mirror ]] || die "no mirror in /etc/apt/sources.list.d/debian.sources"
  mkdir -p "$CACHE_DIR"
  rm -rf "$PRISTINE.tmp"
  start=$(date +%s)
  log "debootstrap bookworm from $mirror (about 70 s)"
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$PRISTINE.tmp" "$mirror" \
    >"$CACHE_DIR/debootstrap.log" 2>&1 || die "debootstrap failed, see $CACHE_DIR/debootstrap.log"
  mv "$PRISTINE.tmp" "$PRISTINE"
  log "debootstrap took $(($(date +%s) - start)) s"
}

write_inventory() {
  # Secrets go on the host line: host variables outrank the playbook's
  # group_vars/all.yml placeholders, [falcon:vars] in an inventory file does not.
  local name secrets=""
  for name in vault_redis_password vault_redis_exporter_password vault_postgresql_owner_password \
              vault_postgresql_writer_password vault_grafana_admin_password; do
    secrets+=" $name=$(openssl rand -hex 24)"
  done
  # The drills' API key: group_vars/e2e.yml gives the host only its SHA-256.
  secrets+=" vault_falcon_svc_e2e_api_key=fsk_e2e_$(openssl rand -hex 32)"
  (
    umask 077
    {
      echo '[falcon]'
      printf "e2ehost ansible_host=127.0.0.1 ansible_port=%s ansible_user=root ansible_ssh_private_key_file=%s ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null' grafana_install_package=false prometheus_alertmanager_notify=false%s\n" \
        "$SSH_PORT" "$KEY" "$secrets"
      printf '\n[e2e:children]\nfalcon\n'
    } >"$INVENTORY"
  )
}

print_info() {
  cat <<EOF
falcon-e2e host is up (systemd-nspawn pid $(nspawn_pid)).
  ssh:       ssh -i $KEY -p $SSH_PORT -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@127.0.0.1
  nginx:     http://127.0.0.1/
  inventory: $INVENTORY
  provision: cd $REPO_DIR/ansible && $ANSIBLE_PLAYBOOK -i $INVENTORY site.yml
  stop:      $0 down
EOF
}

boot_host() {
  require_tools
  mkdir -p "$RUN_DIR"
  if nspawn_pid >/dev/null && ssh_cmd true 2>/dev/null; then
    log "already running"
    return
  fi
  # A half-started or dead previous run: clean it away first.
  cmd_down
  check_ports_free
  ensure_pristine
  local start
  start=$(date +%s)
  mkdir -p "$RUN_DIR"
  log "copying rootfs to $ROOTFS"
  cp -a "$PRISTINE" "$ROOTFS"
  rm -f "$KEY" "$KEY.pub"
  ssh-keygen -q -t ed25519 -N '' -f "$KEY"
  install -d -m 700 "$ROOTFS/root/.ssh"
  install -m 600 "$KEY.pub" "$ROOTFS/root/.ssh/authorized_keys"
  printf 'Port %s\nListenAddress 127.0.0.1\n' "$SSH_PORT" >"$ROOTFS/etc/ssh/sshd_config.d/e2e.conf"
  cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
  # This machine's outbound HTTPS goes through a TLS-inspecting proxy: the host
  # needs the same local CAs, or pip cannot reach PyPI from inside it.
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
    systemd-nspawn -q -D "$ROOTFS" --register=no --keep-unit update-ca-certificates >/dev/null
  fi
  write_inventory

  # On any failure before the host answers, stop it again.
  trap 'log "boot failed; stopping"; cmd_down' ERR INT TERM
  log "booting"
  setsid systemd-nspawn -D "$ROOTFS" -b --register=no --keep-unit \
    --machine="$MACHINE" >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 60); do
    ssh_cmd true 2>/dev/null && break
    [[ -d /proc/$(cat "$PIDFILE") ]] || { tail -20 "$LOG"; false; }
    sleep 0.5
  done
  ssh_cmd true || { tail -20 "$LOG"; false; }
  trap - ERR INT TERM
  log "ssh answers after $(($(date +%s) - start)) s; system state: $(ssh_cmd systemctl is-system-running --wait 2>/dev/null || true)"
}

# provision LOG: ansible-playbook site.yml against the host; the output goes to LOG too.
provision() {
  local out=$1 start rc=0
  start=$(date +%s)
  log "ansible-playbook site.yml (output: $out)"
  (cd "$REPO_DIR/ansible" && "$ANSIBLE_PLAYBOOK" -i "$INVENTORY" site.yml) 2>&1 | tee "$out" || rc=$?
  log "playbook exit $rc after $(($(date +%s) - start)) s: $(grep -E '^e2ehost +:' "$out" | tr -s ' ' || true)"
  return "$rc"
}

# The PLAY RECAP's changed= count of a playbook log.
changed_count() { sed -nE 's/^e2ehost +:.* changed=([0-9]+).*/\1/p' "$1"; }

cmd_up() {
  boot_host
  provision "$RUN_DIR/provision.log"
  print_info
}

cmd_down() {
  local pid
  if pid=$(nspawn_pid); then
    log "stopping systemd-nspawn pid $pid"
    kill -TERM "$pid" 2>/dev/null || true  # it may be exiting already
    for _ in $(seq 1 60); do
      [[ -d /proc/$pid ]] || break
      sleep 0.5
    done
    if [[ -d /proc/$pid ]]; then
      log "still running after 30 s; sending SIGKILL to $pid"
      kill -KILL "$pid" || true
      sleep 1
    fi
    grep -E 'has been shut down|Container .* (exited|terminated)' "$LOG" >&2 || true
  fi
  rm -f "$PIDFILE"
  if [[ -d $ROOTFS ]]; then
    rm -rf --one-file-system "$ROOTFS"
  fi
}

cmd_test() {
  local started changed
  started=$(date +%s)
  trap 'if [[ -z ${E2E_KEEP:-} ]]; then cmd_down; fi' EXIT
  trap 'exit 130' INT TERM
  cmd_down  # always from a fresh copy of the pristine root file system
  boot_host
  trap 'exit 130' INT TERM  # boot_host resets these
  provision "$RUN_DIR/provision-1.log" || die "the first playbook run failed"
  provision "$RUN_DIR/provision-2.log" || die "the second playbook run failed"
  changed=$(changed_count "$RUN_DIR/provision-2.log")
  if [[ $changed != 0 ]]; then
    grep -B3 -E '^changed:' "$RUN_DIR/provision-2.log" | grep -E '^(TASK|RUNNING HANDLER)' >&2 || true
    die "the second playbook run changed $changed things (want changed=0); tasks above"
  fi
  log "second playbook run: changed=0"
  E2E_RUN_DIR=$RUN_DIR bash "$REPO_DIR/scripts/e2e_checks.sh"
  log "end to end: PASS in $(($(date +%s) - started)) s"
}

case ${1:-} in
  up) cmd_up ;;
  provision) provision "$RUN_DIR/provision.log" ;;
  down) cmd_down ;;
  test) cmd_test ;;
  pristine) require_tools && ensure_pristine ;;
  *) echo "usage: $0 up|provision|down|test|pristine" >&2; exit 2 ;;
esac
