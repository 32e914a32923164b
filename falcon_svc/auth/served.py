"""Which API keys the service accepts: read by the gunicorn master, inherited by its workers.

gunicorn's master answers SIGHUP (``systemctl reload falcon-worker@N``:
``ExecReload=/bin/kill -s HUP $MAINPID``) by re-reading its configuration,
forking new workers and stopping the old ones gracefully: in-flight requests
finish, new connections wait in the listen backlog until a new worker takes
them, so a reload fails no request. The keys ride on that:

- the master reads ``API_KEYS_FILE`` at start (``load_in_master``, from the
  ``on_starting`` hook): a file that cannot be read or parsed stops the start
  with one line and exit 78, as any bad setting does;
- the master reads it again on every HUP (``reload_in_master``, from the
  ``on_reload`` hook, which gunicorn runs before it forks the new workers): a
  file that does not parse whole is refused with an error line, and the keys
  before it stay; a good one replaces them whole;
- workers take the master's parsed keys through the fork (``keys_for_app``) and
  never read the file themselves, so every worker of an instance serves the same
  keys, and a worker respawned between reloads (``max_requests``, a crash) does
  not pick up a file edited but not yet reloaded.

Without the master's hooks (``create_app`` in tests, gunicorn run with another
config) ``keys_for_app`` reads the file itself.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from falcon_svc.auth.keys import KeyFileError, KeyStore, load_key_store
from falcon_svc.settings import Settings
from falcon_svc.startup import EXIT_CONFIG

logger = logging.getLogger(__name__)


class _MasterKeys:
    """The keys the master read last, and from where (one per process; workers inherit it)."""

    path: str = ""
    store: KeyStore | None = None


_MASTER = _MasterKeys()


def _load_or_exit(path: str) -> KeyStore:
    try:
        store = load_key_store(Path(path))
    except KeyFileError as ex:
        logger.critical("invalid API key file: %s", ex, extra={"exit_code": EXIT_CONFIG})
        sys.exit(EXIT_CONFIG)
    if not store:
        logger.warning("API key file %s holds no key: every protected route answers 401", path)
    return store


def load_in_master(settings: Settings) -> None:
    """Read ``API_KEYS_FILE`` in the gunicorn master before any worker forks, or exit ``EXIT_CONFIG``."""
    _MASTER.path = settings.api_keys_file
    _MASTER.store = _load_or_exit(settings.api_keys_file) if settings.api_keys_file else None
    if _MASTER.store is not None:
        logger.info("API keys loaded", extra={"api_keys": len(_MASTER.store), "api_keys_file": _MASTER.path})


def reload_in_master() -> None:
    """Re-read the key file on SIGHUP; a file that does not parse whole keeps the keys before it."""
    if _MASTER.store is None:
        return
    try:
        store = load_key_store(Path(_MASTER.path))
    except KeyFileError as ex:
        logger.error(
            "API key file not reloaded, still serving the %d keys loaded before: %s",
            len(_MASTER.store),
            ex,
            extra={"api_keys_file": _MASTER.path},
        )
        return
    _MASTER.store = store
    logger.info("API keys reloaded", extra={"api_keys": len(store), "api_keys_file": _MASTER.path})


def keys_for_app(settings: Settings) -> KeyStore | None:
    """Return the keys a worker serves with (None: authentication off), exiting ``EXIT_CONFIG`` on a bad file."""
    if not settings.api_keys_file:
        logger.warning("API keys off (API_KEYS_FILE is empty): /infer and /v2 inference are open to anyone")
        return None
    if _MASTER.store is not None and _MASTER.path == settings.api_keys_file:
        return _MASTER.store
    return _load_or_exit(settings.api_keys_file)
