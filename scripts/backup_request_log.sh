#!/usr/bin/env bash
# Back up the falcon database (request_log and schema_migrations) with pg_dump, and
# restore request_log from such a dump. Installed on the database host as
# /usr/local/sbin/falcon-svc-backup by the postgresql role; run nightly as the
# postgres OS user by falcon-svc-backup.service (peer auth over the Unix socket: no
# password anywhere). docs/RUNBOOK.md "Restore the request log" is the procedure.
#
#   falcon-svc-backup                 one backup run (what the timer starts)
#   falcon-svc-backup rows FILE       "table<TAB>rows" for each table's data in a dump
#   falcon-svc-backup restore FILE    restore request_log and its partitions from a dump
#                                     (request_log must not exist: drop it first)
#
# Why pg_dump -Fc and not base backups (pg_basebackup + WAL archiving): the database is
# small (days of request_log, one partition per day), a logical dump restores one table
# (or one day's partition) into the live database without touching the rest, reads
# into any later PostgreSQL, minor or major, and needs no WAL archive to run and watch.
# What it does not give: point-in-time recovery; a restore brings back the rows as of
# the last dump (at most a day old), out of scope for a request log.
#
# A run: dump to a temporary name in BACKUP_DIR, read the dump back (it must list
# every table's rows: a truncated file fails here, not on the day of a restore), fsync
# it, rename it to falcon-YYYYMMDDTHHMMSSZ.dump (UTC), fsync the directory, then keep
# the newest BACKUP_KEEP dumps, never the one just written among those deleted. A
# failed run deletes nothing but its own temporary file and exits non-zero with one
# line saying why; a successful one logs one line (file, bytes, rows, seconds).
#
# Settings (environment; the unit reads /etc/default/falcon-svc-backup):
#   BACKUP_DIR        where dumps go (default /var/backups/falcon-svc; postgres, 0700)
#   BACKUP_KEEP       dumps kept, >= 1 (default 7)
#   BACKUP_DATABASE   libpq database name or URI (default falcon: local socket, peer auth)
#   BACKUP_TIMESTAMP  the run's UTC stamp, YYYYMMDDTHHMMSSZ (default now; tests set it)
set -euo pipefail
umask 0077

BACKUP_DIR=${BACKUP_DIR:-/var/backups/falcon-svc}
BACKUP_KEEP=${BACKUP_KEEP:-7}
BACKUP_DATABASE=${BACKUP_DATABASE:-falcon}
# NOTE: the dump waits at most this long for its ACCESS SHARE locks (a migration or a
# retention DROP holding ACCESS EXCLUSIVE): failing is better than queueing all night.
LOCK_WAIT_TIMEOUT=${BACKUP_LOCK_WAIT_TIMEOUT:-10min}
PREFIX=falcon-
SUFFIX=.dump

say() { printf 'falcon-svc-backup: %s\n' "$*"; }
die() {
  printf 'falcon-svc-backup: FAILED: %s\n' "$*" >&2
  exit 1
}

# shown DATABASE: the database for a log line, without a password or URI parameters.
shown() { sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#; s#\?.*##' <<<"$1"; }

# dump_rows FILE: print "table<TAB>rows" for each table with data in the dump, by
# reading every row back out of it (COPY data: one line per row, newlines escaped).
dump_rows() {
  local file=$1
  pg_restore --data-only --file=- -- "$file" | awk '
    /^COPY / { table = $2; sub(/^public\./, "", table); rows[table] = 0; copying = 1; next }
    copying && /^\\\.$/ { copying = 0; next }
    copying { rows[table]++ }
    END { for (t in rows) printf "%s\t%d\n", t, rows[t] }
  ' | sort
}

# prune KEEP JUST_WRITTEN: delete all but the newest KEEP dumps (by their UTC names);
# the one just written is always kept, and counts as one of KEEP. Prints the deleted.
prune() {
  local keep=$1 just_written=$2 kept=1 name
  while IFS= read -r name; do
    [[ $name == "$just_written" ]] && continue
    if ((kept < keep)); then
      kept=$((kept + 1))
    else
      rm -f -- "${BACKUP_DIR:?}/$name"
      printf '%s\n' "$name"
    fi
  done < <(find "$BACKUP_DIR" -maxdepth 1 -type f -name "$PREFIX*$SUFFIX" -printf '%f\n' \
    | grep -E "^${PREFIX}[0-9]{8}T[0-9]{6}Z\\${SUFFIX}\$" | sort -r)
}

backup() {
  [[ $BACKUP_KEEP =~ ^[1-9][0-9]*$ ]] || die "BACKUP_KEEP=$BACKUP_KEEP is not a whole number >= 1; nothing dumped or deleted"
  local stamp=${BACKUP_TIMESTAMP:-$(date -u +%Y%m%dT%H%M%SZ)}
  [[ $stamp =~ ^[0-9]{8}T[0-9]{6}Z$ ]] || die "BACKUP_TIMESTAMP=$stamp is not YYYYMMDDTHHMMSSZ"
  [[ -d $BACKUP_DIR && -w $BACKUP_DIR ]] || die "$BACKUP_DIR is not a writable directory"
  local name=$PREFIX$stamp$SUFFIX
  local final=$BACKUP_DIR/$name started=$EPOCHREALTIME
  # NOTE: a global, not a local: the EXIT trap may run after this function has returned.
  BACKUP_TMP=$BACKUP_DIR/.$name.tmp
  # One run at a time (the timer and a manual start): the lock is on the directory.
  exec {lock}<"$BACKUP_DIR"
  flock --nonblock "$lock" || die "another backup is running in $BACKUP_DIR"
  # Temporary files of a run that was killed (SIGKILL, power loss): never a dump.
  find "$BACKUP_DIR" -maxdepth 1 -type f -name ".$PREFIX*$SUFFIX.tmp*" -delete
  [[ ! -e $final ]] || die "$final exists already; nothing dumped or deleted"
  trap 'rm -f -- "$BACKUP_TMP" "$BACKUP_TMP.err"' EXIT

  local error
  if ! error=$(pg_dump --format=custom --lock-wait-timeout="$LOCK_WAIT_TIMEOUT" --file="$BACKUP_TMP" \
    --dbname="$BACKUP_DATABASE" 2>&1); then
    die "pg_dump of $(shown "$BACKUP_DATABASE") failed, nothing deleted: $(tr '\n' ' ' <<<"$error")"
  fi
  local rows
  rows=$(dump_rows "$BACKUP_TMP" 2>"$BACKUP_TMP.err") \
    || die "the dump cannot be read back, nothing deleted: $(tr '\n' ' ' <"$BACKUP_TMP.err")"
  grep -q "^request_log" <<<"$rows" || die "the dump holds no request_log data, nothing deleted"
  # Durable before it has its name: a crash leaves a .tmp file or a whole dump.
  if ! { sync -- "$BACKUP_TMP" && mv -T -- "$BACKUP_TMP" "$final" && sync -- "$BACKUP_DIR"; }; then
    die "could not fsync or rename the dump into $final, nothing deleted"
  fi
  rm -f -- "$BACKUP_TMP.err"
  trap - EXIT

  local deleted total bytes seconds
  deleted=$(prune "$BACKUP_KEEP" "$name")
  total=$(awk -F'\t' '/^request_log/ { n += $2 } END { print n + 0 }' <<<"$rows")
  bytes=$(stat -c %s -- "$final")
  seconds=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  say "wrote $final ($bytes bytes, $total request_log rows in $(grep -c '^request_log' <<<"$rows") partitions," \
    "${seconds} s); keeping the newest $BACKUP_KEEP, deleted $(grep -c . <<<"$deleted"): $(tr '\n' ' ' <<<"${deleted:-none}")"
}

# restore FILE: create request_log, its partitions, indexes, grants and rows from the
# dump, in one transaction (all or nothing). The list file selects request_log's
# entries only: `pg_restore -t request_log` restores the parent table alone, with no
# partition and so no row, and a whole-database restore would clash with
# schema_migrations and everything else that still exists.
restore() {
  local file=$1
  [[ -r $file ]] || die "cannot read the dump $file"
  local exists
  exists=$(psql -X -At --dbname="$BACKUP_DATABASE" -c "SELECT to_regclass('public.request_log') IS NOT NULL") \
    || die "cannot connect to $(shown "$BACKUP_DATABASE")"
  [[ $exists == f ]] || die "request_log exists: save what it holds and drop it first (docs/RUNBOOK.md)"
  # NOTE: a global, not a local: the EXIT trap runs after this function has returned.
  RESTORE_LIST=$(mktemp)
  trap 'rm -f -- "$RESTORE_LIST"' EXIT
  pg_restore --list -- "$file" | grep -E ' request_log[a-z0-9_]*([ .]|$)' >"$RESTORE_LIST" \
    || die "$file lists no request_log entries"
  pg_restore --single-transaction --exit-on-error --use-list="$RESTORE_LIST" --dbname="$BACKUP_DATABASE" -- "$file" \
    || die "pg_restore of request_log from $file failed; rolled back, nothing restored"
  say "restored request_log from $file; rows per partition, dump vs now:"
  local table rows now short=0
  while IFS=$'\t' read -r table rows; do
    now=$(psql -X -At --dbname="$BACKUP_DATABASE" -c "SELECT count(*) FROM public.\"$table\"")
    printf '%s\t%s\t%s\n' "$table" "$rows" "$now"
    ((now >= rows)) || short=1
  done < <(dump_rows "$file" | grep '^request_log')
  ((short == 0)) || die "a partition holds fewer rows than the dump"
}

case ${1:-backup} in
  backup) backup ;;
  rows) dump_rows "${2:?usage: $0 rows FILE}" ;;
  restore) restore "${2:?usage: $0 restore FILE}" ;;
  *) die "usage: $0 [backup | rows FILE | restore FILE]" ;;
esac
