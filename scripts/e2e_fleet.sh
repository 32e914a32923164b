#!/usr/bin/env bash
# Four Debian 12 hosts on a private network, for the fleet end-to-end test (issue 15;
# recipe: docs/SYSTEMD_HOST.md section 7). Run as root.
#
#   scripts/e2e_fleet.sh up              boot lb, app1, app2 and data, each in its own network
#                                        namespace on the bridge flbr0 (198.18.0.0/24), with no
#                                        route off it; write the inventory; leave them running
#   scripts/e2e_fleet.sh check           prove the layout: systemd runs, peers reach each other's
#                                        sshd, nothing off the bridge is reachable, nft works,
#                                        one host's shutdown or power-off leaves the others up
#   scripts/e2e_fleet.sh down            stop everything `up` made, by exact names; idempotent
#   scripts/e2e_fleet.sh power-off HOST  cut HOST's link, then SIGKILL its nspawn (the drills)
#   scripts/e2e_fleet.sh start HOST      boot a stopped HOST again from its own root
#   scripts/e2e_fleet.sh provision       run ansible/site.yml over the four (firewall on)
#   scripts/e2e_fleet.sh test            up, the isolation checks, provision twice (the second
#                                        must report changed=0 on every host), the fleet checks
#                                        and drills (scripts/e2e_fleet_drills.sh); always down
#
# The packages the roles install are downloaded into the hosts' root before boot (seed, cached
# by a digest of the list and of the pristine root): the bridge never needs a way out.
# Environment:
#   E2E_CACHE_DIR      pristine rootfs and seed cache (default /var/cache/falcon-e2e, shared
#                      with scripts/e2e.sh, which builds the pristine root)
#   E2E_FLEET_RUN_DIR  per-run state: roots, key, inventory, logs (default /tmp/falcon-fleet)
#   E2E_FLEET_ROOT     overlay (default: every root an overlayfs over the seed) or copy (cp -a)
#   E2E_FLEET_LOG_DIR  where `down` keeps the run's logs (default /tmp/falcon-fleet-logs)
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${E2E_CACHE_DIR:-/var/cache/falcon-e2e}
PRISTINE=$CACHE_DIR/rootfs-pristine
SEED_PREFIX=$CACHE_DIR/rootfs-fleet-seed-
RUN_DIR=${E2E_FLEET_RUN_DIR:-/tmp/falcon-fleet}
LOG_DIR=${E2E_FLEET_LOG_DIR:-$RUN_DIR-logs}
KEY=$RUN_DIR/id_ed25519
INVENTORY=$RUN_DIR/inventory.ini
# The secrets, the model and the e2e settings, as extra vars (they outrank group_vars/all.yml's
# placeholders); 0600, generated per run.
EXTRA_VARS=$RUN_DIR/extra-vars.yml
ANSIBLE_PLAYBOOK=${ANSIBLE_PLAYBOOK:-$REPO_DIR/.venv-deploy/bin/ansible-playbook}
# The model every app host serves: trained once on the controller (make model), shipped.
MODEL_SRC=${E2E_FLEET_MODEL_DIR:-$REPO_DIR/models/sentiment}
# Set when this script made /run/netns a mount point (`ip netns add` does on first use), so
# `down` undoes exactly that and nothing another tool made.
NETNS_MOUNT_MARK=$RUN_DIR/netns-mount-ours
BRIDGE=flbr0
NETWORK=198.18.0.0/24  # the benchmarking range: never confused with a real network
BRIDGE_ADDRESS=198.18.0.1
HOSTS=(lb app1 app2 data)
declare -A ADDRESS=([lb]=198.18.0.10 [app1]=198.18.0.11 [app2]=198.18.0.12 [data]=198.18.0.13)
# One cgroup per host (and one for the seed's nspawn) under this name: nspawn puts its payload
# in <own cgroup>/payload, so four nspawns started from one cgroup would share it, and one
# container's shutdown could kill the others' processes.
CGROUP_NAME=falcon-fleet
# Everything the roles' apt tasks install (common, node_exporter, redis, postgresql,
# falcon_svc, nginx, exporters, prometheus; the firewall role's nftables). Grafana is not
# installed in the e2e (grafana_install_package=false), as in scripts/e2e.sh.
FLEET_PACKAGES=(python3-venv curl ca-certificates acl python3-packaging dbus systemd-timesyncd
  nginx redis-server postgresql prometheus prometheus-alertmanager prometheus-node-exporter
  prometheus-nginx-exporter prometheus-redis-exporter prometheus-postgres-exporter nftables)
SSH_WAIT_SECONDS=90
STOP_WAIT_SECONDS=30

log() { printf '[fleet %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

host_dir() { echo "$RUN_DIR/$1"; }
netns_of() { echo "fl-$1"; }
veth_of() { echo "fl-$1-br"; }  # the bridge end; the host's end is eth0 in its namespace

is_fleet_host() {
  local n
  for n in "${HOSTS[@]}"; do [[ $n == "$1" ]] && return 0; done
  return 1
}

ssh_host() {
  local host=$1
  shift
  ssh -i "$KEY" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
    -o ConnectTimeout=3 -o BatchMode=yes "root@${ADDRESS[$host]}" "$@"
}

# The hierarchies that hold processes by cgroup: name=systemd (legacy and hybrid), the unified
# one beside it (hybrid; this machine), or the single cgroup2 tree.
cgroup_roots() {
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    echo /sys/fs/cgroup
    return
  fi
  [[ -d /sys/fs/cgroup/systemd ]] && echo /sys/fs/cgroup/systemd
  [[ -f /sys/fs/cgroup/unified/cgroup.procs ]] && echo /sys/fs/cgroup/unified
  return 0
}

# Move the calling (sub)shell into cgroup falcon-fleet/NAME in every hierarchy.
join_cgroup() {
  local root
  for root in $(cgroup_roots); do
    mkdir -p "$root/$CGROUP_NAME/$1"
    echo "$BASHPID" >"$root/$CGROUP_NAME/$1/cgroup.procs"
  done
}

# Every pid in cgroup falcon-fleet/NAME and below (name=systemd or cgroup2 tree).
cgroup_pids() {
  local root
  root=$(cgroup_roots | head -1)
  [[ -n $root && -d $root/$CGROUP_NAME/$1 ]] || return 0
  find "$root/$CGROUP_NAME/$1" -name cgroup.procs -exec cat {} + 2>/dev/null || true
}

# SIGKILL whatever is left in falcon-fleet/NAME until it is empty: a container whose nspawn
# died, or an nspawn whose script was killed with -9.
kill_cgroup() {
  local pids
  for _ in $(seq 1 40); do
    pids=$(cgroup_pids "$1")
    [[ -z $pids ]] && return 0
    # shellcheck disable=SC2086  # one pid per word
    kill -KILL $pids 2>/dev/null || true
    sleep 0.25
  done
  die "processes still in cgroup $CGROUP_NAME/$1: $(cgroup_pids "$1" | tr '\n' ' ')"
}

# The cgroup a /proc/PID/cgroup text names: name=systemd's (legacy, hybrid) or cgroup2's.
cgroup_path() {
  local line
  line=$(grep -m1 ':name=systemd:' "$1" || grep -m1 '^0::' "$1")
  echo "${line#*:*:}"
}

nspawn_pid() {
  local pid file
  file=$(host_dir "$1")/nspawn.pid
  [[ -f $file ]] || return 1
  pid=$(cat "$file")
  [[ -n $pid && -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == systemd-nspawn ]] \
    && echo "$pid"
}

require_tools() {
  local missing=()
  [[ $EUID -eq 0 ]] || die "run as root: namespaces, mounts and systemd-nspawn need it"
  command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
  command -v ssh >/dev/null || missing+=(openssh-client)
  command -v ip >/dev/null || missing+=(iproute2)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get install -y "${missing[@]}" >/dev/null
  fi
  # The single-host e2e's debootstrap root, built once and shared (same E2E_CACHE_DIR).
  E2E_CACHE_DIR=$CACHE_DIR bash "$REPO_DIR/scripts/e2e.sh" pristine
}

# The seed's directory: named by a digest of the package list and of the pristine root's
# installed packages, so a changed list or a rebuilt pristine root gets a new seed.
seed_dir() {
  local digest
  digest=$({
    printf '%s\n' "${FLEET_PACKAGES[@]}" | sort
    sha256sum <"$PRISTINE/var/lib/dpkg/status"
  } | sha256sum | cut -c1-16)
  echo "$SEED_PREFIX$digest"
}

# The pristine root plus the .debs of FLEET_PACKAGES (with recommends: the apt module installs
# them) in /var/cache/apt/archives, downloaded but not installed: each host installs only
# its roles' packages, offline, when Ansible runs.
ensure_seed() {
  local seed=$1 start old
  if [[ -f $seed/.falcon-fleet-seed ]]; then
    log "reusing seed $seed"
    return
  fi
  start=$(date +%s)
  for old in "$SEED_PREFIX"*; do
    if [[ -e $old ]]; then rm -rf --one-file-system "$old"; fi  # an older list's seed, or a half-built one
  done
  log "building seed $seed: ${#FLEET_PACKAGES[@]} packages, download only"
  mkdir "$seed.tmp"
  cp -a "$PRISTINE/." "$seed.tmp/"  # "/.": the pristine root may be a symlink to it
  # Not booted, it shares this machine's network, as debootstrap does: the one moment the
  # hosts' packages cross the network. The local CAs for a TLS-inspecting proxy, as e2e.sh.
  cp /etc/resolv.conf "$seed.tmp/etc/resolv.conf"
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$seed.tmp/usr/local/share/ca-certificates/"
  fi
  (
    join_cgroup seed
    exec systemd-nspawn -q -D "$seed.tmp" --register=no --keep-unit sh -c \
      "update-ca-certificates >/dev/null && apt-get update -q && apt-get install -y -q --download-only ${FLEET_PACKAGES[*]}"
  ) >"$CACHE_DIR/fleet-seed.log" 2>&1 || { tail -20 "$CACHE_DIR/fleet-seed.log" >&2; die "seed download failed"; }
  # The hosts have no DNS (nothing to ask) and each gets its own machine id.
  : >"$seed.tmp/etc/resolv.conf"
  : >"$seed.tmp/etc/machine-id"
  touch "$seed.tmp/.falcon-fleet-seed"
  mv "$seed.tmp" "$seed"
  log "seed built in $(($(date +%s) - start)) s: $(find "$seed/var/cache/apt/archives" -name '*.deb' | wc -l) .debs, $(du -sh "$seed/var/cache/apt/archives" | cut -f1)"
}

setup_network() {
  local n ns veth
  # After `down`, anything left on 198.18.0.0/24 belongs to someone else: do not shadow it.
  if ip -o addr show to "$NETWORK" | grep -q . || ip route show "$NETWORK" | grep -q .; then
    ip -o addr show to "$NETWORK" >&2
    die "$NETWORK is already in use on this machine"
  fi
  ip link add "$BRIDGE" type bridge
  ip addr add "$BRIDGE_ADDRESS/24" dev "$BRIDGE"
  # Per input device: nothing arriving from the hosts is forwarded, even if another tool
  # turns on ip_forward globally. The controller's address is only for ssh (Ansible).
  sysctl -qw "net.ipv4.conf.$BRIDGE.forwarding=0" "net.ipv6.conf.$BRIDGE.forwarding=0"
  ip link set "$BRIDGE" up
  mountpoint -q /run/netns || touch "$NETNS_MOUNT_MARK"
  for n in "${HOSTS[@]}"; do
    ns=$(netns_of "$n") veth=$(veth_of "$n")
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "${ADDRESS[$n]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    # No default route is ever added: the connected /24 must be the only IPv4 route.
    [[ $(ip -n "$ns" -4 route show | wc -l) == 1 && -z $(ip -n "$ns" route show default) ]] \
      || die "unexpected routes in $ns: $(ip -n "$ns" route show)"
  done
}

# HOST's root: an overlayfs over the seed (instant, shares the seed's ~0.5 GB), or a copy.
prepare_root() {
  local n=$1 seed=$2 dir root mode=${E2E_FLEET_ROOT:-overlay}
  dir=$(host_dir "$n") root=$(host_dir "$n")/root
  mkdir -p "$dir/upper" "$dir/work" "$root"
  if [[ $mode == overlay ]] && mount -t overlay "falcon-fleet-$n" \
    -o "lowerdir=$seed,upperdir=$dir/upper,workdir=$dir/work" "$root" 2>>"$dir/mount.log"; then
    echo overlay >"$dir/root-mode"
  else
    [[ $mode == overlay ]] && log "$n: overlay mount failed ($(tail -1 "$dir/mount.log")); copying"
    cp -a "$seed/." "$root/"
    echo copy >"$dir/root-mode"
  fi
  echo "$n" >"$root/etc/hostname"
  {
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
    printf '%s\tfleet-controller\n' "$BRIDGE_ADDRESS"
    local peer
    for peer in "${HOSTS[@]}"; do printf '%s\t%s\n' "${ADDRESS[$peer]}" "$peer"; done
  } >"$root/etc/hosts"
  # The pristine root's machine id would be shared by all four (journald, dbus tell hosts
  # apart by it); an empty one would make systemd treat every boot as the first (presets).
  od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$root/etc/machine-id"
  echo >>"$root/etc/machine-id"
  if [[ -f $root/var/lib/dbus/machine-id && ! -L $root/var/lib/dbus/machine-id ]]; then
    cp "$root/etc/machine-id" "$root/var/lib/dbus/machine-id"
  fi
  install -d -m 700 "$root/root/.ssh"
  install -m 600 "$KEY.pub" "$root/root/.ssh/authorized_keys"
  # sshd answers only on the private address: the only way in is over the bridge.
  printf 'ListenAddress %s\n' "${ADDRESS[$n]}" >"$root/etc/ssh/sshd_config.d/fleet.conf"
  rm -f "$root"/etc/ssh/ssh_host_*  # own host keys, not the pristine root's shared ones
  ssh-keygen -q -A -f "$root"
}

# Boot HOST in the background, in its own cgroup and its own network namespace.
# CAP_NET_ADMIN: nspawn grants it with --private-network but not with a given namespace (nft
# fails "Operation not permitted" without it), and the firewall role's nftables needs it; it
# acts on the host's own namespace only.
boot_host() {
  local n=$1 dir
  dir=$(host_dir "$n")
  (
    join_cgroup "$n"
    # setsid: a Ctrl-C in the terminal must not shut the hosts down behind the script's back.
    exec setsid systemd-nspawn -D "$dir/root" -b --register=no --keep-unit --machine="fleet-$n" \
      --network-namespace-path="/run/netns/$(netns_of "$n")" --capability=cap_net_admin
  ) >>"$dir/nspawn.log" 2>&1 </dev/null &
  echo $! >"$dir/nspawn.pid"
  disown $!  # `power-off` SIGKILLs it: no "Killed" job notice from this shell
  # The pid is the subshell's until it execs nspawn: wait for that, so nspawn_pid finds it.
  for _ in $(seq 1 50); do
    nspawn_pid "$n" >/dev/null && return 0
    [[ -d /proc/$(cat "$dir/nspawn.pid") ]] || break
    sleep 0.1
  done
  tail -20 "$dir/nspawn.log" >&2
  die "$n: systemd-nspawn did not start"
}

# Wait until every HOST given answers on ssh; log how long each took from START.
wait_ssh() {
  local start=$1 n pending
  shift
  pending=("$@")
  for _ in $(seq 1 $((SSH_WAIT_SECONDS * 2))); do
    local still=()
    for n in "${pending[@]}"; do
      if ssh_host "$n" true 2>/dev/null; then
        log "$n: ssh answers after $(($(date +%s) - start)) s"
      else
        nspawn_pid "$n" >/dev/null || { tail -20 "$(host_dir "$n")/nspawn.log" >&2; die "$n: nspawn exited"; }
        still+=("$n")
      fi
    done
    ((${#still[@]} == 0)) && return 0
    pending=("${still[@]}")
    sleep 0.5
  done
  die "no ssh after ${SSH_WAIT_SECONDS} s on: ${pending[*]}"
}

host_line() {
  printf "%s ansible_host=%s falcon_private_address=%s ansible_user=root ansible_ssh_private_key_file=%s ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n" \
    "$1" "${ADDRESS[$1]}" "${ADDRESS[$1]}" "$KEY"
}

# Connection variables on the host lines (as scripts/e2e.sh: host variables outrank the
# playbook's group_vars/all.yml); data is the monitoring host too.
write_inventory() {
  (
    umask 077
    {
      printf '[falcon_lb]\n%s\n\n' "$(host_line lb)"
      printf '[falcon_app]\n%s\n%s\n\n' "$(host_line app1)" "$(host_line app2)"
      printf '[falcon_data]\n%s\n\n' "$(host_line data)"
      printf '[falcon_monitoring]\ndata\n\n'
      printf '[falcon:children]\nfalcon_lb\nfalcon_app\nfalcon_data\nfalcon_monitoring\n\n'
      # group_vars/e2e.yml: the drills' API key (its SHA-256 on the hosts).
      printf '[e2e:children]\nfalcon\n'
    } >"$INVENTORY"
  )
  write_extra_vars
}

# A throw-away CA and the data host's server certificate (names its private address, the
# one the app hosts verify, and 127.0.0.1), for PostgreSQL's and Redis's TLS.
make_tls() {
  local dir=$RUN_DIR/tls
  rm -rf "$dir" && mkdir -m 700 "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=falcon-fleet-e2e-ca -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=data \
    -keyout "$dir/data.key" -out "$dir/data.csr" 2>/dev/null
  printf 'subjectAltName=IP:%s,IP:127.0.0.1,DNS:data\nextendedKeyUsage=serverAuth\n' "${ADDRESS[data]}" >"$dir/data.ext"
  openssl x509 -req -in "$dir/data.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/data.ext" -out "$dir/data.crt" 2>/dev/null
}

# Fresh secrets per run, a shared request-log HMAC key and the shipped model (more than one
# app host needs both: ansible/tasks/layout.yml), the firewall on, TLS to PostgreSQL and
# Redis, and apt offline: the seed's package lists are the hosts' only ones, so the cache
# is never "too old" to use.
write_extra_vars() {
  local name tls=$RUN_DIR/tls
  make_tls
  (
    umask 077
    {
      for name in vault_redis_password vault_redis_exporter_password vault_postgresql_owner_password \
        vault_postgresql_writer_password vault_grafana_admin_password; do
        printf '%s: "%s"\n' "$name" "$(openssl rand -hex 24)"
      done
      printf 'vault_falcon_svc_e2e_api_key: "fsk_e2e_%s"\n' "$(openssl rand -hex 32)"
      printf 'falcon_svc_log_text_hmac_secret: "%s"\n' "$(openssl rand -hex 32)"
      printf 'falcon_svc_model_src: "%s"\n' "$MODEL_SRC"
      printf 'firewall_enabled: true\n'
      printf 'postgresql_tls_cert_src: %s\npostgresql_tls_key_src: %s\n' "$tls/data.crt" "$tls/data.key"
      printf 'redis_tls_cert_src: %s\nredis_tls_key_src: %s\nredis_tls_ca_src: %s\n' "$tls/data.crt" "$tls/data.key" "$tls/ca.crt"
      printf 'falcon_svc_db_tls_ca_src: %s\nfalcon_svc_redis_tls_ca_src: %s\n' "$tls/ca.crt" "$tls/ca.crt"
      printf 'grafana_install_package: false\nprometheus_alertmanager_notify: false\n'
      printf 'common_apt_cache_valid_time: 315360000\nfirewall_apt_cache_valid_time: 315360000\n'
    } >"$EXTRA_VARS"
  )
}

# provision LOG: ansible-playbook site.yml over the four hosts; the output goes to LOG too.
cmd_provision() {
  local out=${1:-$RUN_DIR/provision.log} start rc=0
  [[ -f $INVENTORY ]] || die "no fleet running: run '$0 up' first"
  [[ -f $MODEL_SRC/model.joblib ]] || die "no trained model in $MODEL_SRC: run 'make model MODEL_DIR=$MODEL_SRC'"
  start=$(date +%s)
  log "ansible-playbook site.yml over ${HOSTS[*]} (output: $out)"
  (cd "$REPO_DIR/ansible" && "$ANSIBLE_PLAYBOOK" -i "$INVENTORY" -e "@$EXTRA_VARS" site.yml) >"$out" 2>&1 || rc=$?
  log "playbook exit $rc after $(($(date +%s) - start)) s"
  grep -E '^(lb|app1|app2|data) +:' "$out" | tr -s ' ' >&2 || true
  if ((rc != 0)); then
    grep -E -A12 '^(fatal|failed):' "$out" | head -60 >&2 || true
  fi
  return "$rc"
}

# The PLAY RECAP's changed= counts of a playbook log, summed over the hosts.
changed_total() { sed -nE 's/^(lb|app1|app2|data) +:.* changed=([0-9]+).*/\2/p' "$1" | awk '{ sum += $1 } END { print sum + 0 }'; }

cmd_test() {
  local started changed
  started=$(date +%s)
  trap 'rc=$?; trap - EXIT; if [[ -z ${E2E_KEEP:-} ]]; then cmd_down; fi; exit $rc' EXIT
  trap 'exit 130' INT TERM
  cmd_up
  trap 'rc=$?; trap - EXIT; if [[ -z ${E2E_KEEP:-} ]]; then cmd_down; fi; exit $rc' EXIT
  trap 'exit 130' INT TERM
  check_network
  cmd_provision "$RUN_DIR/provision-1.log" || die "the first playbook run failed"
  cmd_provision "$RUN_DIR/provision-2.log" || die "the second playbook run failed"
  changed=$(changed_total "$RUN_DIR/provision-2.log")
  if [[ $changed != 0 ]]; then
    grep -B3 -E '^changed:' "$RUN_DIR/provision-2.log" | grep -E '^(TASK|RUNNING HANDLER)' >&2 || true
    die "the second playbook run changed $changed things (want changed=0); tasks above"
  fi
  log "second playbook run: changed=0 on ${HOSTS[*]}"
  E2E_FLEET_RUN_DIR=$RUN_DIR bash "$REPO_DIR/scripts/e2e_fleet_drills.sh"
  log "fleet end to end: PASS in $(($(date +%s) - started)) s"
}

cmd_up() {
  local start seed t_seed t_roots t_boot n
  require_tools
  start=$(date +%s)
  # Tear down on any failure or interrupt before the fleet is complete; `down` first, so a
  # killed earlier run's leftovers never meet this one.
  trap 'rc=$?; trap - EXIT; if ((rc != 0)); then log "up failed (exit $rc); tearing down"; cmd_down; fi; exit $rc' EXIT
  trap 'exit 130' INT TERM
  cmd_down
  seed=$(seed_dir)
  ensure_seed "$seed"
  t_seed=$(date +%s)
  mkdir -p "$RUN_DIR"
  ssh-keygen -q -t ed25519 -N '' -C falcon-fleet -f "$KEY"
  setup_network
  for n in "${HOSTS[@]}"; do prepare_root "$n" "$seed"; done
  t_roots=$(date +%s)
  log "network and roots ($(cat "$(host_dir lb)/root-mode")) in $((t_roots - t_seed)) s; booting ${HOSTS[*]}"
  for n in "${HOSTS[@]}"; do boot_host "$n"; done
  wait_ssh "$t_roots" "${HOSTS[@]}"
  t_boot=$(date +%s)
  for n in "${HOSTS[@]}"; do
    log "$n: system $(ssh_host "$n" timeout 60 systemctl is-system-running --wait 2>/dev/null || true)"
  done
  write_inventory
  trap - EXIT INT TERM
  log "up: seed $((t_seed - start)) s, network+roots $((t_roots - t_seed)) s, boot to ssh $((t_boot - t_roots)) s, total $(($(date +%s) - start)) s"
  log "inventory: $INVENTORY; ssh: ssh -i $KEY root@${ADDRESS[lb]}"
}

# Stop HOSTs with SIGTERM (a clean shutdown), SIGKILL after STOP_WAIT_SECONDS; then make
# sure nothing is left in their cgroups.
stop_hosts() {
  local n pid pids=()
  for n in "$@"; do
    if pid=$(nspawn_pid "$n"); then
      log "$n: stopping systemd-nspawn pid $pid"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for _ in $(seq 1 $((STOP_WAIT_SECONDS * 2))); do
    local alive=0
    for pid in "${pids[@]}"; do [[ -d /proc/$pid ]] && alive=1; done
    ((alive == 0)) && break
    sleep 0.5
  done
  for pid in "${pids[@]}"; do
    if [[ -d /proc/$pid ]]; then
      log "nspawn $pid still running after $STOP_WAIT_SECONDS s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for n in "$@"; do
    kill_cgroup "$n"
    rm -f "$(host_dir "$n")/nspawn.pid"
  done
}

# Tear-down by exact names, each step tolerant of the thing being gone already.
cmd_down() {
  local n root target
  [[ $EUID -eq 0 ]] || die "run as root"
  stop_hosts "${HOSTS[@]}"
  kill_cgroup seed  # a seed download whose script was killed
  if [[ -d $RUN_DIR ]]; then
    # Deepest first; lazily if something still holds one (it cannot, every process is gone).
    { findmnt -rn -o TARGET | grep -F "$RUN_DIR/" || true; } | sort -r | while read -r target; do
      umount "$target" 2>/dev/null || umount -l "$target"
    done
  fi
  for n in "${HOSTS[@]}"; do
    ip netns del "$(netns_of "$n")" 2>/dev/null || true
    ip link del "$(veth_of "$n")" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if [[ -f $NETNS_MOUNT_MARK ]] && mountpoint -q /run/netns && [[ -z $(ls -A /run/netns) ]]; then
    umount /run/netns && rmdir /run/netns
  fi
  for root in $(cgroup_roots); do
    if [[ -d $root/$CGROUP_NAME ]]; then
      find "$root/$CGROUP_NAME" -depth -type d -exec rmdir {} + 2>/dev/null || true
    fi
    if [[ -d $root/$CGROUP_NAME ]]; then log "WARNING: $root/$CGROUP_NAME could not be removed"; fi
  done
  if findmnt -rn -o TARGET | grep -qF "$RUN_DIR/"; then
    die "still mounted under $RUN_DIR: $(findmnt -rn -o TARGET | grep -F "$RUN_DIR/" | tr '\n' ' ')"
  fi
  keep_logs
  rm -rf --one-file-system "$RUN_DIR" "$SEED_PREFIX"*.tmp
  return 0
}

# The run's logs (playbook runs, drills) outlive the tear-down, for a post-mortem:
# LOG_DIR holds the last run's.
keep_logs() {
  [[ -d $RUN_DIR ]] || return 0
  rm -rf "$LOG_DIR" && mkdir -p "$LOG_DIR"
  (cd "$RUN_DIR" && find . -maxdepth 2 -name '*.log' -not -path './hosts/*' -exec cp --parents {} "$LOG_DIR/" \;) || true
}

# A host that vanishes: its link goes down first, so peers see silence (connects time out), not
# the resets a namespace whose processes died would send; then its nspawn and every process
# of the container die at once. The root and the namespace stay for `start`.
cmd_power_off() {
  local n=$1 pid
  is_fleet_host "$n" || die "no such host: $n (hosts: ${HOSTS[*]})"
  ip link set "$(veth_of "$n")" down
  if pid=$(nspawn_pid "$n"); then
    kill -KILL "$pid"
  fi
  kill_cgroup "$n"
  rm -f "$(host_dir "$n")/nspawn.pid"
  log "$n: powered off"
}

cmd_start() {
  local n=$1 start
  is_fleet_host "$n" || die "no such host: $n (hosts: ${HOSTS[*]})"
  [[ -d $(host_dir "$n")/root/etc ]] || die "$n has no root: run '$0 up' first"
  nspawn_pid "$n" >/dev/null && die "$n is running already"
  kill_cgroup "$n"
  start=$(date +%s)
  ip link set "$(veth_of "$n")" up
  boot_host "$n"
  wait_ssh "$start" "$n"
}

# The systemd-nspawn pid, sshd's main pid and the container's PID 1 start time (ticks): if any
# changes, the host was stopped or restarted.
host_fingerprint() {
  echo "$(nspawn_pid "$1" || echo none) $(ssh_host "$1" 'systemctl show -p MainPID --value ssh; cut -d" " -f22 /proc/1/stat' 2>/dev/null | tr '\n' ' ')"
}

check_others_intact() {
  local stopped=$1 n state
  shift
  for n in "${HOSTS[@]}"; do
    [[ $n == "$stopped" ]] && continue
    [[ $(host_fingerprint "$n") == "${FINGERPRINT[$n]}" ]] \
      || die "$n changed while $stopped stopped: ${FINGERPRINT[$n]} -> $(host_fingerprint "$n")"
    state=$(ssh_host "$n" systemctl is-system-running 2>/dev/null || true)
    [[ $state == running || $state == degraded ]] || die "$n is '$state' after $stopped stopped"
  done
}

# The layout: systemd in every host, peers reach each other over the bridge, nothing off it
# is reachable, nft works offline.
check_network() {
  local n peer gw mirror state rc cg failed=0
  [[ -f $INVENTORY ]] || die "no fleet running: run '$0 up' first"
  gw=$(ip route show default | awk '{print $3; exit}')
  [[ -n $gw ]] || die "this machine has no default gateway to probe"
  # A destination off the machine that the controller does reach (the seed came from it):
  # proves the hosts' failure is the network's doing, not a dead address.
  mirror=$(getent ahostsv4 deb.debian.org | awk '{print $1; exit}' || true)

  for n in "${HOSTS[@]}"; do
    nspawn_pid "$n" >/dev/null || die "$n: systemd-nspawn is not running"
    cg=$(cgroup_path "/proc/$(nspawn_pid "$n")/cgroup")
    [[ $cg == "/$CGROUP_NAME/$n"* ]] || die "$n: nspawn in cgroup '$cg', not /$CGROUP_NAME/$n"
    [[ $(ssh_host "$n" cat /proc/1/comm) == systemd ]] || die "$n: PID 1 is not systemd"
    state=$(ssh_host "$n" systemctl is-system-running 2>/dev/null || true)
    [[ $state == running || $state == degraded ]] || die "$n: system is '$state'"
    log "$n: PID 1 systemd, system $state, nspawn cgroup $cg, container's PID 1 sees $(ssh_host "$n" 'grep -m1 name=systemd /proc/1/cgroup || grep 0:: /proc/1/cgroup')"
  done

  for n in "${HOSTS[@]}"; do
    for peer in "${HOSTS[@]}"; do
      [[ $peer == "$n" ]] && continue
      ssh_host "$n" "timeout 3 bash -c '</dev/tcp/${ADDRESS[$peer]}/22'" 2>/dev/null \
        || { log "FAIL: $n cannot reach $peer's sshd (${ADDRESS[$peer]}:22); a FORWARD drop in this machine's netfilter (bridge-nf-call-iptables=1)?"; failed=1; }
    done
  done
  ((failed == 0)) && log "every host reaches every peer's sshd over $BRIDGE (12 connects)"

  for n in "${HOSTS[@]}"; do
    [[ $(ssh_host "$n" 'ip -4 route show' | wc -l) == 1 ]] \
      || { log "FAIL: $n has routes besides the bridge's: $(ssh_host "$n" ip route show | tr '\n' ';')"; failed=1; }
    if ssh_host "$n" "ip route get $gw" >/dev/null 2>&1; then
      log "FAIL: $n has a route to the gateway $gw"; failed=1
    fi
    for peer in "$gw" ${mirror:+"$mirror"}; do
      if ssh_host "$n" "timeout 3 bash -c '</dev/tcp/$peer/80'" 2>/dev/null; then
        log "FAIL: $n opened a TCP connection to $peer:80 off the bridge"; failed=1
      fi
    done
  done
  # Second line of defence: even a host that added a default route via the controller gets
  # nowhere, because the controller does not forward what arrives on the bridge.
  if [[ -n $mirror ]] && timeout 5 bash -c "</dev/tcp/$mirror/80" 2>/dev/null; then
    ip -n "$(netns_of lb)" route add default via "$BRIDGE_ADDRESS"
    rc=0
    ip netns exec "$(netns_of lb)" timeout 3 bash -c "</dev/tcp/$mirror/80" 2>/dev/null || rc=$?
    ip -n "$(netns_of lb)" route del default
    ((rc != 0)) || { log "FAIL: with a default route via the controller, lb reached $mirror:80"; failed=1; }
    log "off the bridge: no host routes to $gw or $mirror:80 (which this machine reaches); with a default route added, lb still cannot (exit $rc)"
  else
    log "off the bridge: no host routes to $gw or ${mirror:-the mirror}:80 (the controller could not reach the mirror either: weaker proof)"
  fi
  ((failed == 0)) || die "network isolation checks failed (above)"

  # nftables from the seed's cache, offline: proves both the seed and CAP_NET_ADMIN.
  local pids=()
  for n in "${HOSTS[@]}"; do
    ssh_host "$n" 'apt-get install -y -q --no-download nftables >/dev/null 2>&1 &&
      nft add table inet falcon_fleet_check && nft list ruleset | grep -q "table inet falcon_fleet_check" &&
      nft delete table inet falcon_fleet_check' &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  ((failed == 0)) || die "nft (installed offline from the seed) does not work in every host"
  log "nftables installed offline from the seed and 'nft list ruleset' works on ${HOSTS[*]}"
}

cmd_check() {
  local n rc start
  check_network
  declare -gA FINGERPRINT=()
  for n in "${HOSTS[@]}"; do FINGERPRINT[$n]=$(host_fingerprint "$n"); done
  start=$(date +%s)
  stop_hosts app1
  grep -q 'has been shut down' "$(host_dir app1)/nspawn.log" || log "WARNING: app1 did not log a clean shutdown"
  check_others_intact app1
  log "app1 shut down cleanly in $(($(date +%s) - start)) s; lb, app2, data kept running (same nspawn, sshd and PID 1)"
  cmd_start app1
  FINGERPRINT[app1]=$(host_fingerprint app1)
  cmd_power_off app1
  rc=0
  ssh_host lb "timeout 2 bash -c '</dev/tcp/${ADDRESS[app1]}/22'" 2>/dev/null || rc=$?
  ((rc != 0)) || die "lb still reaches app1 after its power-off"
  check_others_intact app1
  log "app1 powered off: lb's connect to it fails (exit $rc, 124 = silent timeout); the other three kept running"
  cmd_start app1
  log "check: PASS"
}

case ${1:-} in
  up) cmd_up ;;
  check) cmd_check ;;
  down) cmd_down ;;
  power-off) cmd_power_off "${2:?usage: $0 power-off HOST}" ;;
  start) cmd_start "${2:?usage: $0 start HOST}" ;;
  provision) cmd_provision "$RUN_DIR/provision.log" ;;
  test) cmd_test ;;
  *) echo "usage: $0 up|check|down|power-off HOST|start HOST|provision|test" >&2; exit 2 ;;
esac
