"""Closed-loop load from threads: each sends its next request as soon as the last is answered."""

from __future__ import annotations

import threading


class ClosedLoop:
    """``clients`` threads calling ``send_one(client, count)`` until the ``with`` block ends."""

    def __init__(self, clients: int) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)]

    def send_one(self, client: int, count: int) -> None:
        raise NotImplementedError

    def _run(self, client: int) -> None:
        count = 0
        while not self._stop.is_set():
            self.send_one(client, count)
            count += 1

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
