"""Run gunicorn workers on meinheld's event loop, without meinheld's own worker class.

meinheld serves a bare Falcon app at about three times gthread's rate, but the worker
class it ships (``meinheld.gmeinheld.MeinheldWorker``, unmaintained since 2020) is
unsafe under gunicorn 27:

- its C heartbeat (``server.set_fastwatchdog``) only ``fchmod()``s the worker temp file,
  which moves the ctime; the arbiter's ``murder_workers()`` compares the *mtime* with
  ``time.monotonic()``, so a hung worker is never killed and ``--timeout`` is ignored;
- it assigns ``gunicorn.glogging.Logger.error``/``access`` class-wide, in the master
  too, so the first worker death (SIGKILL, OOM, timeout) crashes the master with
  ``TypeError: _error() got an unexpected keyword argument 'exc_info'``;
- ``server.run()`` swaps gunicorn's SIGTERM and SIGINT handlers for C ones that close
  whatever is still in flight one second later, whatever ``graceful_timeout`` says.

``MeinheldWorker`` below heartbeats through gunicorn's own ``Worker.notify()``, once
before serving and then from meinheld's Python watchdog hook, hands meinheld a logger
adapter instead of patching gunicorn, and puts gunicorn's signal handling back once
meinheld's loop is running.
Select it with ``worker_class = "falcon_svc.workers.MeinheldWorker"``.

Two more defects live in meinheld's C core, before any Python runs, so no worker class
can fix them: its own errors (a body over ``max_content_length``, a malformed request)
are HTML pages, and it answers ``Expect: 100-continue`` only after the whole body has
arrived, which the client holds back until it gets the 100 (a 1 s stall with curl).
``scripts/meinheld/install.sh`` builds meinheld with our patches for both, as
``1.0.2+falcon.3``; ``check_config`` warns when the stock build is installed.

The same build fixes what a client can do to a worker's file descriptors: a request
line and headers must arrive within ``header_timeout_seconds`` (upstream re-arms 30 s
on every byte, so a client dribbling its headers held a descriptor for ever), and a
worker out of descriptors (EMFILE) accepts and closes new connections, and serves
again once some close, where upstream stopped its server and so the worker.
Connections past ``worker_connections`` are closed at once (``set_picoev_max_fd``).
And it makes stopping safe from a signal handler, which runs inside meinheld's accept
loop: upstream went on accepting on the socket the handler had closed, stopped the
server a second time and so ended its loop with requests in flight (a client reset
during a reload), and left the closed socket in its epoll, taking wake-ups meant for
the other workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from importlib import metadata
from types import FrameType, TracebackType
from typing import Any

from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.workers.base import Worker
from meinheld import server

# meinheld calls the watchdog when its loop's whole-second clock (time(NULL)) ticks,
# and waits at most one second for events: an idle worker heartbeats every second,
# two at worst. Below this, the arbiter could kill healthy idle workers.
MIN_TIMEOUT_SECONDS = 3

# The build of meinheld that scripts/meinheld/install.sh makes, with our C patches.
PATCHED_MEINHELD_VERSION = "1.0.2+falcon.3"

# Seconds a connection has to send its whole request line and headers, from its
# accept (a kept-alive connection: from its last response, so keepalive, when
# shorter, wins). nginx sends a request head in one write, and its own
# client_header_timeout (60 s) guards the slow clients it serves, so 10 s is
# generous for anything legitimate and bounds how long a slowloris client holds a
# descriptor. meinheld caps it at 120 s (its timer wheel).
HEADER_TIMEOUT_SECONDS = 10

# The signals meinheld's server.run() takes over with its own C handlers.
_SIGNALS_MEINHELD_TAKES = (signal.SIGTERM, signal.SIGINT)

_SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class MeinheldLogAdapter:
    """Speak meinheld's logger protocol on top of a gunicorn logger.

    meinheld's C core calls ``error(type, value, tb)`` when the app raises and
    ``access(environ)`` after each response; gunicorn's logger takes
    ``error(msg, *args, **kwargs)`` and ``access(resp, req, environ, request_time)``.
    Adapting here, in the worker, leaves gunicorn's ``Logger`` class (and so the
    master's logging) untouched, and keeps ``access_log_format`` and any custom
    ``logger_class`` in charge of the access log.
    """

    def __init__(self, log: Logger) -> None:
        self._log = log

    def error(self, exc_type: type[BaseException], exc_value: BaseException, tb: TracebackType | None) -> None:
        """Log an exception meinheld caught, with its traceback.

        meinheld normalises the exception before the call (log.c), so the value is an
        instance, never None.
        """
        self._log.error("Error handling request", exc_info=(exc_type, exc_value, tb))

    def access(self, environ: dict[str, Any]) -> None:
        """Log one request in gunicorn's access log format."""
        if "REQUEST_METHOD" not in environ:
            # meinheld also reports keep-alive connections closed before any request
            # came in, with an environ of its own; there is no request to log.
            return
        # NOTE: gunicorn's atoms read RAW_URI, which meinheld does not set, and
        # QUERY_STRING, which it leaves out when empty. The environ is this request's
        # own and is discarded right after, so filling them in is safe.
        query = environ.setdefault("QUERY_STRING", "")
        if "RAW_URI" not in environ:
            path = environ.get("PATH_INFO", "-")
            environ["RAW_URI"] = f"{path}?{query}" if query else path
        headers = [(key[5:].replace("_", "-"), value) for key, value in environ.items() if key.startswith("HTTP_")]
        response = _LoggedResponse(environ.get("STATUS_CODE", "-"), environ.get("SEND_BYTES"))
        request_time = timedelta(milliseconds=environ.get("REQUEST_TIME", 0))
        # NOTE: gunicorn's atoms() duck-types both: status, sent and headers of the response,
        # and a list of header pairs in place of the request (glogging.py). Its stubs name
        # gunicorn's own Response and Request, hence the ignore.
        self._log.access(response, headers, environ, request_time)  # type: ignore[arg-type]


class _LoggedResponse:
    """Carry what gunicorn's access-log atoms read from a response object."""

    __slots__ = ("headers", "sent", "status")

    def __init__(self, status: object, sent: int | None) -> None:
        self.status = str(status)
        self.sent = sent
        # meinheld does not expose the response headers; ``%({name}o)s`` logs "-".
        self.headers: list[tuple[str, str]] = []


class MeinheldWorker(Worker):
    """Serve with meinheld, heartbeating, logging and shutting down the gunicorn way."""

    # Largest request body meinheld reads before answering 413 itself (it buffers the
    # whole body before the app runs). None keeps meinheld's own 16 MiB; the service
    # sets MAX_BODY_BYTES here (gunicorn_conf.post_worker_init) so both limits agree.
    max_body_bytes: int | None = None
    # See HEADER_TIMEOUT_SECONDS; a hook (post_worker_init) may change it per worker.
    header_timeout_seconds: int = HEADER_TIMEOUT_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # NOTE: this runs in the master, before fork: nothing process-wide here.
        super().__init__(*args, **kwargs)
        # Seconds of grace meinheld gets to finish in-flight requests, or None while
        # no shutdown has been asked for.
        self._shutdown_grace: int | None = None
        # True once meinheld's loop runs: only then does server.stop() let go of the
        # listening sockets at once, so that we may close them.
        self._loop_started = False

    @classmethod
    def check_config(cls, cfg: Config, log: Logger) -> None:
        """Warn, at master start, about settings this worker cannot honour."""
        if 0 < cfg.timeout < MIN_TIMEOUT_SECONDS:
            log.warning(
                "timeout=%s is below %s s: meinheld heartbeats only once a second, "
                "so idle workers may be killed as hung",
                cfg.timeout,
                MIN_TIMEOUT_SECONDS,
            )
        installed = metadata.version("meinheld")
        if installed != PATCHED_MEINHELD_VERSION:
            log.warning(
                "meinheld %s is not our patched build %s: its own errors (413 over the body limit, "
                "400) will be HTML, 'Expect: 100-continue' stalls, slow request heads are never "
                "timed out and running out of file descriptors stops the worker; install it with "
                "scripts/meinheld/install.sh",
                installed,
                PATCHED_MEINHELD_VERSION,
            )

    def run(self) -> None:
        """Configure meinheld from gunicorn's settings and serve until told to stop."""
        if self._shutdown_grace is not None:
            return  # told to stop while booting
        adapter = MeinheldLogAdapter(self.log)
        server.set_error_logger(adapter)
        # Skip the per-request Python call when gunicorn would drop the line anyway.
        server.set_access_logger(adapter if getattr(self.log, "access_log_enabled", True) else None)
        server.set_keepalive(self.cfg.keepalive)
        self._set_header_timeout()
        # NOTE: this caps the descriptor *number* picoev watches, not a count: the
        # worker's own descriptors (listen socket, logs, Redis, PostgreSQL) come
        # first, and connections numbered past it are closed at once (patched build).
        server.set_picoev_max_fd(self.cfg.worker_connections)
        if self.max_body_bytes is not None:
            server.set_max_content_length(self.max_body_bytes)
        server.set_listen_socket([sock.fileno() for sock in self.sockets])
        # NOTE: never set_fastwatchdog(): once it is set, meinheld ignores this hook.
        server.set_watchdog(self.watchdog)

        # server.run() installs C handlers for SIGTERM and SIGINT before its loop starts;
        # a zero-delay call is the first thing the loop runs, and puts back the handlers
        # in place now (ours, or hooks chained in front of them in post_worker_init).
        handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS_MEINHELD_TAKES}
        server.schedule_call(0, self._on_loop_start, handlers)
        # Nothing reads gunicorn's wake-up pipe under meinheld; don't let it fill up.
        signal.set_wakeup_fd(-1)

        app = self.wsgi if self.max_requests == sys.maxsize else self._recycling(self.wsgi)
        # Heartbeat once before serving anything, as gunicorn's own workers do. Until the
        # first notify() the temp file holds its creation time, from the wall clock, which
        # the arbiter compares with time.monotonic(): decades "in the future", so it would
        # never time the worker out. And meinheld may never call the watchdog before a
        # request hangs: its first loop turn accepts up to 8 connections in a row and runs
        # each request at once, so a request that hangs there does so before any watchdog.
        self.notify()
        # KeyboardInterrupt only if SIGINT hit in the instant before _on_loop_start,
        # when meinheld's own handler still held it: a quick exit either way.
        with contextlib.suppress(KeyboardInterrupt):
            server.run(app)

    def _set_header_timeout(self) -> None:
        """Give request heads a deadline, loudly doing without on a build that cannot."""
        set_header_timeout = getattr(server, "set_header_timeout", None)
        if set_header_timeout is None:
            self.log.warning(
                "meinheld %s has no header timeout: slow clients can hold connections for ever; "
                "install it with scripts/meinheld/install.sh",
                metadata.version("meinheld"),
            )
            return
        set_header_timeout(self.header_timeout_seconds)

    def _recycling(self, app: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap the app to drain and exit after max_requests, as gunicorn's own workers do.

        meinheld's loop never looks at max_requests; without this, a leak the setting
        is meant to contain would grow for ever.
        """

        def counting_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            self.nr += 1
            if self.nr >= self.max_requests and self._shutdown_grace is None:
                self.log.info("Autorestarting worker after current request.")
                self._stop(self.cfg.graceful_timeout)
            return app(environ, start_response)

        return counting_app

    def _on_loop_start(self, handlers: dict[int, _SignalHandler]) -> None:
        """Restore gunicorn's signal handlers, and catch up on a stop asked for meanwhile."""
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        self._loop_started = True
        if self._shutdown_grace is not None:
            server.stop(self._shutdown_grace)
            self._close_listeners()

    def watchdog(self) -> None:
        """Heartbeat, and stop if orphaned; meinheld calls this from its loop once a second.

        Being called from the loop is what makes the heartbeat prove liveness: a request
        that blocks the loop (a stuck call, a busy loop) also stops the heartbeat, and
        the arbiter kills the worker ``timeout`` seconds after the last one. run() sends
        the first heartbeat itself: meinheld calls this only after a whole loop turn,
        which a request can hang in.
        """
        self.notify()
        if self._shutdown_grace is None and self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            self._stop(self.cfg.graceful_timeout)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Drain on SIGTERM: stop accepting, finish in-flight requests within graceful_timeout."""
        self._stop(self.cfg.graceful_timeout)

    def handle_quit(self, sig: int, frame: FrameType | None) -> None:
        """Stop quickly on SIGQUIT or SIGINT, after gunicorn's worker_int hook."""
        self.cfg.worker_int(self)
        # meinheld's shortest grace: whatever is still in flight a second later is closed.
        self._stop(0)

    def handle_abort(self, sig: int, frame: FrameType | None) -> None:
        """Die on SIGABRT, which the arbiter sends when the heartbeat stops (timeout)."""
        self.alive = False
        self.cfg.worker_abort(self)
        # NOTE: the handler runs inside the stuck request, where the SystemExit of
        # gunicorn's sys.exit(1) would become a 500 and the worker would carry on.
        with contextlib.suppress(Exception):
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(1)

    def _stop(self, grace_seconds: int) -> None:
        """Record a shutdown and ask meinheld's loop to carry it out; the first one wins.

        NOTE: handlers only record: server.stop() just stops accepting and arms a
        timer in the loop. Before the loop runs it is a no-op, and _on_loop_start
        repeats it. Once is enough: upstream's kill_server() (server.c) unregistered
        the listen sockets and decremented its count of live events on every call,
        which could end the loop while requests were in flight (our build, patch 0005,
        makes it idempotent; the first call still decides the grace).
        """
        self.alive = False
        if self._shutdown_grace is not None:
            return
        self._shutdown_grace = int(grace_seconds)
        # Every later response closes its connection: meinheld checks this setting per
        # request. Otherwise nginx keeps reusing its keep-alive connections to a draining
        # worker, which serves them until the traffic stops and never exits.
        server.set_keepalive(0)
        server.stop(self._shutdown_grace)
        if self._loop_started:
            self._close_listeners()

    def _close_listeners(self) -> None:
        """Close this process's copies of the listening sockets, which meinheld no longer watches.

        The port closes once the master and every worker have closed theirs (and
        systemd has let go of its copy, on a stop for good): connections still
        queued there are reset, and nginx retries them on another unit at once,
        rather than after this worker's in-flight requests are done. Safe only on our
        build: upstream's accept loop went on with the closed socket (see the top).
        """
        for listener in self.sockets:
            with contextlib.suppress(OSError):
                listener.close()
