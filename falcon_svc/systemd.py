"""Run gunicorn in-process and speak systemd's notify protocol from the master.

gunicorn 27 sends ``READY=1`` itself in ``Arbiter.start()``, before any worker has
loaded the model, so ``systemctl start`` would return (and ``After=`` units start)
while nothing can answer yet. ``serve()`` below runs gunicorn in this process with
an ``Arbiter`` subclass that:

- takes ``NOTIFY_SOCKET``/``WATCHDOG_*`` out of the environment before gunicorn
  reads it, so gunicorn's own early ``READY=1`` is a no-op and workers never see
  the socket (``NotifyAccess=main``: only the master may notify);
- sends ``READY=1`` once a worker has run ``post_worker_init`` (the app and its
  model are loaded), reported through a pipe the master polls in its main loop;
- sends ``WATCHDOG=1`` from the main loop, so a hung master stops pinging and
  systemd kills and restarts it (``WatchdogSec=``);
- sends ``STOPPING=1`` when the drain starts, and ``RELOADING=1`` on SIGHUP
  followed by ``READY=1`` once a worker of the new generation has booted;
- gives its listening socket to systemd's file descriptor store
  (``FDSTORE=1``, ``FileDescriptorStoreMax=`` in the unit), and takes it back
  from ``LISTEN_FDS`` when systemd starts it again.

Why the fd store: systemd keeps stored descriptors while a restart job runs
(``systemctl restart``, the target's restart, ``Restart=on-failure``) and closes
them when the unit is stopped for good. So across a restart the port never stops
listening: nginx's connections queue in the kernel's backlog and the new master
answers them, where a closed port would be refused, and with every instance
restarting at once (``systemctl restart falcon-svc.target``) nginx would have
nowhere to go but a 502. A plain ``stop`` still closes the port, so nginx moves
to the other instances at once instead of waiting on a queue nobody serves. A
``falcon-worker@.socket`` unit would hold the port too, but also through a stop,
and would start the service again on the next connection: a ``stop`` that does
not stop, and whose queued requests wait for a whole start-up.
"""

from __future__ import annotations

import array
import contextlib
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, NoReturn

from gunicorn.app.base import BaseApplication
from gunicorn.app.wsgiapp import WSGIApplication
from gunicorn.arbiter import Arbiter
from gunicorn.glogging import Logger
from gunicorn.workers.base import Worker
from sdnotify import SystemdNotifier

from falcon_svc.unit_jobs import own_unit, stopping_for_good

logger = logging.getLogger(__name__)

GUNICORN_CONFIG = "python:falcon_svc.gunicorn_conf"
WSGI_APP = "falcon_svc.app:get_app()"

# Poll the boot pipe this often until READY=1 is sent: how late READY may be.
BOOT_POLL_SECONDS = 0.2
# gunicorn's own main-loop wait; we only ever shorten it.
ARBITER_LOOP_SECONDS = 1.0
# The name our listening socket has in systemd's fd store (LISTEN_FDNAMES on the way back).
FDSTORE_NAME = "listen"


class Notifier:
    """Send sd_notify messages to one socket, logging failures (sdnotify is silent)."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._socket_notifier: SystemdNotifier | None = None
        self._failing = False
        if address:
            # NOTE: sdnotify reads NOTIFY_SOCKET itself, at construction only.
            previous = os.environ.get("NOTIFY_SOCKET")
            os.environ["NOTIFY_SOCKET"] = address
            try:
                self._socket_notifier = SystemdNotifier(debug=True)
            except OSError as ex:
                logger.error("cannot connect to NOTIFY_SOCKET %s: %s; systemd will not hear from us", address, ex)
            finally:
                if previous is None:
                    os.environ.pop("NOTIFY_SOCKET", None)
                else:
                    os.environ["NOTIFY_SOCKET"] = previous

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> Notifier:
        """Take the notify socket and watchdog settings out of ``environ`` (workers inherit it)."""
        address = environ.pop("NOTIFY_SOCKET", None)
        watchdog_usec = environ.pop("WATCHDOG_USEC", "")
        watchdog_pid = environ.pop("WATCHDOG_PID", "")
        usec = int(watchdog_usec) if watchdog_usec.isdigit() else 0
        # sd_watchdog_enabled(3): a WATCHDOG_PID naming another process is not for us.
        if watchdog_pid and watchdog_pid != str(os.getpid()):
            usec = 0
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """Return whether messages go anywhere."""
        return self._socket_notifier is not None

    @property
    def watchdog_interval(self) -> float:
        """Return the seconds between watchdog pings (a third of WatchdogSec), 0 when off."""
        return self.watchdog_usec / 3_000_000 if self.enabled else 0.0

    def send(self, state: str, fds: tuple[int, ...] = ()) -> bool:
        """Send ``state`` (and ``fds``, for FDSTORE=1); on failure log (loudly the first time) and return False."""
        if self._socket_notifier is None:
            return False
        try:
            if fds:
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
                self._socket_notifier.socket.sendmsg([state.encode()], [rights])
            else:
                self._socket_notifier.notify(state)
        except OSError as ex:
            level = logging.DEBUG if self._failing else logging.ERROR
            logger.log(level, "sd_notify %r to %s failed: %s", state.partition("\n")[0], self.address, ex)
            self._failing = True
            return False
        if self._failing:
            logger.warning("sd_notify to %s works again", self.address)
            self._failing = False
        return True

    def close(self) -> None:
        """Close this process's copy of the socket (workers inherit it through fork)."""
        if self._socket_notifier is not None and self._socket_notifier.socket is not None:
            self._socket_notifier.socket.close()
        self._socket_notifier = None


class NotifyingArbiter(Arbiter):
    """A gunicorn arbiter that tells systemd the truth about readiness and liveness."""

    # Arbiter declares it optional; setup(), which __init__ runs, always sets it.
    log: Logger

    def __init__(self, app: WSGIApplication, notifier: Notifier) -> None:
        self.notifier = notifier
        # Workers write their pid here after post_worker_init; the master polls it.
        self._boot_read, self._boot_write = os.pipe()
        os.set_blocking(self._boot_read, False)
        os.set_inheritable(self._boot_read, False)
        os.set_inheritable(self._boot_write, False)
        self._ready = False
        # READY=1 needs a worker spawned after this age: 0 at start, bumped by SIGHUP.
        self._ready_after_age = 0
        self._last_ping = float("-inf")
        self._stopping = False
        super().__init__(app)

    # --- configuration ----------------------------------------------------------
    def setup(self, app: BaseApplication) -> None:
        """Load the config (again on SIGHUP) and chain our boot report to post_worker_init."""
        super().setup(app)
        hook = self.cfg.post_worker_init
        if not isinstance(hook, _BootReportingHook):
            self.cfg.set("post_worker_init", _BootReportingHook(hook, self))

    def _worker_booted(self, worker: Worker) -> None:
        """In the worker: report the boot to the master, and drop the notify socket."""
        self.notifier.close()
        with contextlib.suppress(OSError):
            os.write(self._boot_write, f"{os.getpid()}\n".encode())

    # --- the main loop ------------------------------------------------------------
    def start(self) -> None:
        """Start as gunicorn does (its own READY=1 finds no NOTIFY_SOCKET), pinging around it."""
        self._watchdog_ping(force=True)
        self._drop_foreign_listen_fds()
        super().start()
        self._store_listeners()
        self.notifier.send(f"STATUS=listening on {self.cfg.address}; waiting for a worker to boot")
        self._watchdog_ping(force=True)

    # --- the listening socket across restarts ----------------------------------------
    def _drop_foreign_listen_fds(self) -> None:
        """Forget inherited sockets bound elsewhere than BIND (the setting changed): bind afresh.

        gunicorn would serve on whatever LISTEN_FDS hands it, whatever ``bind`` says.
        """
        inherited = inherited_listen_fds(os.environ)
        if not inherited:
            return
        wanted = {_address_key(address) for address in self.cfg.address}
        found = set()
        for fd in inherited:
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
                found.add(_address_key(sock.getsockname()))
        if found == wanted:
            return
        self.log.warning(
            "systemd handed back sockets on %s but BIND is %s: closing them and binding afresh",
            sorted(found),
            sorted(wanted),
        )
        for fd in inherited:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.notifier.send(f"FDSTOREREMOVE=1\nFDNAME={FDSTORE_NAME}")
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)

    def _store_listeners(self) -> None:
        """Give the listening sockets to systemd's fd store, unless they came from it."""
        if not self.notifier.enabled:
            return
        if self.systemd:
            self.log.info("listening socket handed back by systemd: connections queued during the restart are served")
            return
        fds = tuple(listener.sock.fileno() for listener in self.LISTENERS)
        if self.notifier.send(f"FDSTORE=1\nFDNAME={FDSTORE_NAME}", fds):
            self.log.info("listening socket given to systemd's fd store: a restart keeps the port listening")

    def wait_for_signals(self, timeout: float | None = ARBITER_LOOP_SECONDS) -> list[int]:
        """Wait as gunicorn does (None: until a signal), but wake often enough for READY=1 and the watchdog."""
        wait = math.inf if timeout is None else timeout
        if not self._ready:
            wait = min(wait, BOOT_POLL_SECONDS)
        if self.notifier.watchdog_interval:
            # Half the ping interval: pings are at most 1.5 intervals (WatchdogSec/2) apart.
            wait = min(wait, self.notifier.watchdog_interval / 2)
        return super().wait_for_signals(timeout=None if math.isinf(wait) else wait)

    def manage_workers(self) -> None:
        """Keep the worker count, then report readiness and ping the watchdog.

        Runs on every iteration of the main loop: if the loop hangs, the pings stop.
        """
        super().manage_workers()
        self._check_booted_workers()
        self._watchdog_ping()

    def _check_booted_workers(self) -> None:
        try:
            reported = os.read(self._boot_read, 4096)
        except BlockingIOError:
            return
        if self._ready:
            return
        for pid in reported.split():
            worker = self.WORKERS.get(int(pid))
            if worker is not None and worker.age > self._ready_after_age:
                self._ready = True
                if not self.notifier.enabled:
                    return
                self.notifier.send(
                    f"READY=1\nSTATUS=serving on {self.cfg.address} with {self.num_workers} workers "
                    f"(first booted: pid {int(pid)})"
                )
                self.log.info("sent READY=1 to systemd: worker %s booted", int(pid))
                return

    def _watchdog_ping(self, force: bool = False) -> None:
        interval = self.notifier.watchdog_interval
        if not interval or self._stopping:
            return
        now = time.monotonic()
        if force or now - self._last_ping >= interval:
            self._last_ping = now
            self.notifier.send("WATCHDOG=1")

    # --- reload and stop ----------------------------------------------------------
    def handle_hup(self) -> None:
        """Reload as gunicorn does, inside RELOADING=1 ... READY=1 (a new worker booted)."""
        self._ready = False
        self._ready_after_age = self.worker_age
        self.notifier.send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        super().handle_hup()

    def stop(self, graceful: bool = True) -> None:
        """Say STOPPING=1 (once) before the drain, so systemd stops expecting pings.

        On a stop for good, also take the listening socket out of systemd's fd
        store first: the port then closes as soon as the workers let go of it
        (meinheld's as the drain starts), so nginx sends new requests elsewhere
        instead of queueing them here until the drain ends. A restart keeps it.
        """
        if not self._stopping:
            self._stopping = True
            self.notifier.send("STOPPING=1\nSTATUS=draining workers")
            self._release_stored_listeners()
        super().stop(graceful)

    def _release_stored_listeners(self) -> None:
        if not self.notifier.enabled:
            return
        unit = own_unit()
        for_good = stopping_for_good(unit)
        if for_good is None:
            self.log.warning("cannot tell a stop from a restart of %s: the port stays open until the drain ends", unit)
        elif for_good:
            self.notifier.send(f"FDSTOREREMOVE=1\nFDNAME={FDSTORE_NAME}")
            self.log.info("stopping for good: listening socket taken out of systemd's fd store")
        else:
            self.log.info("restarting: systemd keeps the listening socket, connections wait for the new master")


def inherited_listen_fds(environ: MutableMapping[str, str]) -> list[int]:
    """Return the descriptors systemd passed this process (sd_listen_fds(3)), without consuming them."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = environ.get("LISTEN_FDS", "")
    return list(range(3, 3 + int(count))) if count.isdigit() else []


def _address_key(address: object) -> str:
    """Return a comparable form of a socket address: ('127.0.0.1', 8001) and its IPv6 4-tuple alike."""
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)


class _BootReportingHook:
    """A post_worker_init hook: the config's own, then the boot report to the master.

    A class rather than a closure so that setup() can tell its own hook (already
    chained) from the config's, and never chain twice.
    """

    def __init__(self, original: Callable[[Worker], None], arbiter: NotifyingArbiter) -> None:
        self.original = original
        self.arbiter = arbiter

    def __call__(self, worker: Worker) -> None:
        self.original(worker)
        self.arbiter._worker_booted(worker)


class ServiceApplication(WSGIApplication):
    """gunicorn's command-line application, fed our config and app, run by our arbiter."""

    def __init__(self, gunicorn_args: list[str], notifier: Notifier) -> None:
        self.notifier = notifier
        self.argv = ["-c", GUNICORN_CONFIG, *gunicorn_args, WSGI_APP]
        super().__init__("falcon-svc serve [GUNICORN OPTIONS]", prog="falcon-svc serve")

    def load_config(self) -> None:
        """Parse our argv instead of sys.argv (gunicorn's parser reads sys.argv[1:])."""
        saved = sys.argv
        sys.argv = ["falcon-svc serve", *self.argv]
        try:
            super().load_config()
        finally:
            sys.argv = saved

    def run(self) -> Any:
        """Run the master loop until it exits (gunicorn's ``BaseApplication.run``, our arbiter)."""
        try:
            NotifyingArbiter(self, self.notifier).run()
        except RuntimeError as ex:
            print(f"\nError: {ex}\n", file=sys.stderr, flush=True)
            exit_now(1)
        except SystemExit as ex:
            exit_now(ex.code)


def exit_now(code: object) -> NoReturn:
    """Exit with ``code`` as ``sys.exit`` would, without tearing the interpreter down.

    gunicorn ends the master and each worker (after ``worker_exit``, which has
    flushed the request log) with ``sys.exit``, which reaches here. Finalising an
    interpreter that has numpy and scikit-learn loaded took 0.3-0.5 s per process
    (up to 2 s on a loaded host), measured: time a restart's queued connections
    spend waiting, with nothing left to do in it but flush the logs.
    """
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


def serve(gunicorn_args: list[str]) -> None:
    """Run gunicorn with falcon_svc.gunicorn_conf in this process; returns only by SystemExit."""
    # NOTE: before gunicorn's Config snapshots the environment: its own sd_notify
    # then finds no socket, and no worker inherits one.
    notifier = Notifier.from_environ(os.environ)
    ServiceApplication(gunicorn_args, notifier).run()
