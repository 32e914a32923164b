"""The ``falcon-svc`` command: serve, check, migrate, train, keys.

``serve`` runs the gunicorn master in this process (``falcon_svc.systemd``), so
under systemd it is the unit's main process, as ``Type=notify`` and
``NotifyAccess=main`` require, and it sends READY=1 only once a worker has booted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from falcon_svc.auth.commands import register as register_keys_command
from falcon_svc.logs import configure_logging
from falcon_svc.model_commands import register as register_model_command
from falcon_svc.redact import redact
from falcon_svc.store_commands import register as register_models_command


def serve(args: argparse.Namespace) -> int:
    """Run gunicorn with our config; extra arguments pass through to gunicorn."""
    from falcon_svc import systemd

    systemd.serve(args.gunicorn_args)
    return 0  # pragma: no cover - the arbiter leaves by SystemExit


def check(args: argparse.Namespace) -> int:
    """Validate settings and the model as the service would, then print a summary (passwords hidden)."""
    from falcon_svc.settings import describe
    from falcon_svc.startup import load_model_or_exit, load_settings_or_exit

    settings = load_settings_or_exit()
    model = load_model_or_exit(settings)
    shown = {"settings": describe(settings), "model": model.summary(), "model_signature": model.metadata["signature"]}
    print(json.dumps(shown, indent=2))
    return 0


def migrate(args: argparse.Namespace) -> int:
    """Apply the SQL migrations to DATABASE_URL (safe to run twice, or concurrently).

    With ``--if-reachable`` (what ``make run`` calls) and REQUEST_LOG_ENABLED=false the
    service never talks to PostgreSQL, so there is nothing to migrate and nothing
    degraded to report. A plain ``migrate`` still migrates: an operator asked for it.
    """
    import psycopg

    from falcon_svc.requestlog.migrate import MigrationError, apply_migrations
    from falcon_svc.startup import load_settings_or_exit

    settings = load_settings_or_exit()
    if args.if_reachable and not settings.request_log_enabled:
        print("migrate: skipped, the request log is off (REQUEST_LOG_ENABLED=false)")
        return 0
    try:
        applied = apply_migrations(settings.database_url, retention_days=settings.request_log_retention_days)
    except (psycopg.OperationalError, MigrationError) as ex:
        if args.if_reachable and isinstance(ex, psycopg.OperationalError):
            reason = redact(str(ex).splitlines()[0])
            print(f"DEGRADED: PostgreSQL unreachable ({reason}); request-log rows will be spooled", file=sys.stderr)
            return 0
        print(f"migrate: {redact(ex)}", file=sys.stderr)
        return 1
    print(f"migrate: applied {', '.join(applied)}" if applied else "migrate: schema is up to date")
    return 0


def retention(args: argparse.Namespace) -> int:
    """Create request_log's partitions ahead, drop those older than REQUEST_LOG_RETENTION_DAYS."""
    from falcon_svc.requestlog.retention import command

    return command(args)


def train(args: argparse.Namespace) -> int:
    """Train the model (or the dummy when the data package is missing)."""
    from falcon_svc.training.train_cli import main as train_main

    return train_main(args.train_args)


def main(argv: list[str] | None = None) -> int:
    """Run the ``falcon-svc`` command line."""
    parser = argparse.ArgumentParser(prog="falcon-svc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run gunicorn with falcon_svc.gunicorn_conf")
    serve_parser.add_argument("gunicorn_args", nargs=argparse.REMAINDER, help="extra gunicorn arguments")
    serve_parser.set_defaults(handler=serve)
    check_parser = commands.add_parser("check", help="validate settings and the model, print a summary")
    check_parser.set_defaults(handler=check)
    migrate_parser = commands.add_parser("migrate", help="apply the SQL migrations to DATABASE_URL")
    migrate_parser.add_argument(
        "--if-reachable",
        action="store_true",
        help="exit 0 with a DEGRADED line when PostgreSQL is unreachable; do nothing when REQUEST_LOG_ENABLED=false",
    )
    migrate_parser.set_defaults(handler=migrate)
    retention_parser = commands.add_parser("retention", help="drop request_log days past REQUEST_LOG_RETENTION_DAYS")
    retention_parser.add_argument("--dry-run", action="store_true", help="log what would change, change nothing")
    retention_parser.set_defaults(handler=retention)
    train_parser = commands.add_parser("train", help="train the model (falcon-svc train --help)", add_help=False)
    train_parser.add_argument("train_args", nargs=argparse.REMAINDER)
    train_parser.set_defaults(handler=train)
    register_model_command(commands)
    register_models_command(commands)
    register_keys_command(commands)
    args, unknown = parser.parse_known_args(argv)
    # serve and train pass options they do not know on to gunicorn and training.
    if args.command == "train":
        args.train_args = [*unknown, *args.train_args]
    elif args.command == "serve":
        args.gunicorn_args = [*unknown, *args.gunicorn_args]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # An empty LOG_LEVEL= line (an env file leaving it to the default) means unset, as in settings.
    configure_logging(os.environ.get("LOG_LEVEL", "").strip() or "info")
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
