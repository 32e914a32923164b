"""gunicorn configuration for falcon-svc: ``gunicorn -c python:falcon_svc.gunicorn_conf``.

Every value comes from the environment through ``Settings`` (see ``.env.example``),
so the systemd unit's ``EnvironmentFile`` is the one place an operator changes.
Settings are validated once more in ``on_starting``, where a bad value can stop
the master with a distinct exit code before any worker forks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from falcon_svc.settings import Settings, SettingsError
from falcon_svc.startup import check_worker_class_or_exit

if TYPE_CHECKING:
    # The hooks' annotations only: this module's names stay gunicorn settings and hooks.
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

# --- Prometheus multiprocess directory --------------------------------------
# NOTE: must be in the environment before any process imports prometheus_client,
# and workers inherit it from the master. Under systemd it lives in the unit's
# RuntimeDirectory (tmpfs, private to the instance); by hand, in a temp dir
# named after the bind address so two local services never share one.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _runtime = os.environ.get("RUNTIME_DIRECTORY")
    _bind_tag = os.environ.get("BIND", "127.0.0.1:8000").replace("/", "_").replace(":", "_")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = (
        os.path.join(_runtime.split(":")[0], "metrics")
        if _runtime
        else os.path.join(tempfile.gettempdir(), f"falcon-svc-metrics-{_bind_tag}")
    )

try:
    _settings = Settings.from_env()
except SettingsError:
    # Let on_starting report it with its exit code; gunicorn would otherwise
    # print a traceback and exit 1, which systemd would retry forever.
    _settings = Settings()

# --- Socket ----------------------------------------------------------------
bind = [_settings.bind]
backlog = 2048

# --- Workers ---------------------------------------------------------------
# The model is CPU-bound: one worker per core is the starting point; the
# systemd template runs one gunicorn per port, each with WORKERS workers.
workers = _settings.workers
# NOTE: gunicorn imports the worker class while it reads this file, before any hook:
# a missing meinheld must stop here with its one line and exit 78, not a traceback.
check_worker_class_or_exit(_settings)
worker_class = _settings.gunicorn_worker_class
# NOTE: gthread only. gunicorn silently turns "sync" into gthread when threads > 1,
# so every other class gets exactly 1.
threads = _settings.threads if _settings.worker_class == "gthread" else 1
# NOTE: no preload: each worker loads the model after the fork, so nothing that
# owns threads or sockets (pools, the log writer) ever crosses a fork.
preload_app = False
# NOTE: gunicorn's default, stated because the systemd unit's LimitNOFILE= is sized
# from it: each worker holds at most this many client connections (meinheld: client
# descriptors numbered below it; gthread: open connections), and its own descriptors
# (Redis, PostgreSQL, logs, body temp files) need the rest of the limit.
worker_connections = 1000
max_requests = _settings.max_requests
max_requests_jitter = max(_settings.max_requests // 10, 0)

# --- Timeouts --------------------------------------------------------------
# timeout: a worker silent this long is killed and replaced (hung request).
timeout = _settings.timeout_seconds
# graceful_timeout: the drain budget after SIGTERM; systemd's TimeoutStopSec
# must exceed it, or systemd SIGKILLs a worker still finishing requests.
graceful_timeout = _settings.graceful_shutdown_timeout_seconds
# keepalive: how long an idle connection from nginx stays open. nginx's
# upstream keepalive_timeout must be SHORTER than this, or nginx may reuse a
# connection gunicorn has just closed and fail a POST with a 502.
keepalive = _settings.keepalive_seconds

# --- HTTP limits -------------------------------------------------------------
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190

# --- Control socket ------------------------------------------------------------
# gunicorn 27's control socket defaults to one path in $HOME, which several
# instances (falcon-worker@8001, @8002, ...) would fight over; systemctl and
# signals are the operator's tools here.
control_socket_disable = True

# --- Logging ---------------------------------------------------------------
# Our middleware writes one JSON line per request, so gunicorn's access log is
# off; gunicorn's own messages go to stdout as JSON too, for journald.
accesslog = None
errorlog = "-"
# gunicorn would build (and drop) an access line per request: see the class.
logger_class = "falcon_svc.gunicorn_logging.AccessAwareLogger"
loglevel = _settings.log_level
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "falcon_svc.logs.JSONFormatter"}},
    # JSON lines on stdout; under systemd, journal entries with priority and fields (falcon_svc/journal.py).
    "handlers": {"stdout": {"class": "falcon_svc.logs.LineHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
    "root": {"level": _settings.log_level.upper(), "handlers": ["stdout"]},
    "loggers": {
        "gunicorn.error": {"level": _settings.log_level.upper(), "handlers": ["stdout"], "propagate": False},
        "gunicorn.access": {"level": "WARNING", "handlers": ["stdout"], "propagate": False},
    },
}
proc_name = f"falcon-svc[{_settings.bind}]"


# --- Hooks -----------------------------------------------------------------
def on_starting(server: Arbiter) -> None:
    """Check settings and the model in the master, before any worker forks.

    NOTE: falcon_svc.systemd sends READY=1 to systemd only once a worker has
    loaded the app; gunicorn's own early READY is kept from systemd.
    """
    # NOTE: empty the metrics directory before importing the app, whose metric
    # objects open their files there on import.
    _reset_multiproc_dir(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    from falcon_svc.auth.served import load_in_master as load_api_keys_in_master
    from falcon_svc.startup import load_model_or_exit, load_settings_or_exit

    settings = load_settings_or_exit()
    model = load_model_or_exit(settings)
    load_api_keys_in_master(settings)
    logging.getLogger("falcon_svc.app").info(
        "starting", extra={"model_version": model.version, "model_kind": model.kind, "bind": settings.bind}
    )


def on_reload(server: Arbiter) -> None:
    """Re-read API_KEYS_FILE before gunicorn forks the new workers; a bad file keeps the keys before it."""
    from falcon_svc.auth.served import reload_in_master

    reload_in_master()


def _reset_multiproc_dir(path: Path) -> None:
    """Start with an empty metrics directory: stale files would resurrect dead workers' series."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


def post_worker_init(worker: Worker) -> None:
    """Hook SIGTERM so /readyz turns 503 the moment the drain starts; give meinheld our body limit."""
    from falcon_svc.lifecycle import LIFECYCLE

    LIFECYCLE.install_sigterm_hook()
    if _settings.worker_class == "meinheld":
        # Imported here: falcon_svc.workers imports meinheld, which other classes lack.
        from falcon_svc.workers import MeinheldWorker

        if isinstance(worker, MeinheldWorker):
            # NOTE: meinheld reads a whole body before the app runs, and refuses one over
            # its own limit (16 MiB) itself; at MAX_BODY_BYTES both limits are the same.
            worker.max_body_bytes = _settings.max_body_bytes


def child_exit(server: Arbiter, worker: Worker) -> None:
    """Drop the dead worker's live gauges so its series do not linger."""
    from falcon_svc.metrics import mark_worker_dead

    # int(): gunicorn's stubs type pid as the "[booting]" placeholder it holds before the
    # fork; here, in the master, it is the dead child's int pid.
    mark_worker_dead(int(worker.pid))


def worker_exit(server: Arbiter, worker: Worker) -> None:
    """Let go of the listening sockets, then flush the request log (or spool it) before the worker ends.

    NOTE: closing first lets the port close (on a stop for good) while the log is
    flushed: connections still queued there are reset and retried by nginx on
    another unit now, not after the flush. Closing twice is harmless (meinheld's
    worker closes them as its drain starts).
    """
    from falcon_svc.lifecycle import LIFECYCLE

    for listener in worker.sockets:
        with contextlib.suppress(OSError):
            listener.close()
    LIFECYCLE.run_exit_hooks()


def worker_abort(worker: Worker) -> None:
    """Log the timeout kill (SIGABRT) with the worker's pid, once."""
    worker.log.error("worker %s timed out and is being replaced", worker.pid)
