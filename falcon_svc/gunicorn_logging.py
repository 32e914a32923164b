"""gunicorn's logger, told that an access log its logger drops is no access log.

gunicorn counts its access log as on whenever ``logconfig_dict`` is set, which ours
is (JSON lines for gunicorn's own messages: ``falcon_svc.gunicorn_conf``). Every
request then built gunicorn's access atoms (a dict of the whole environ) and a
line that the ``gunicorn.access`` logger, at WARNING, threw away; without it the e2e
host served 19 % more requests/s (docs/PERFORMANCE_NOTES.md). With this class the meinheld
worker registers no access callback at all, and gunicorn's own workers return at
the top of ``access()``. An operator who sets ``gunicorn.access`` to INFO gets the
lines back.
"""

from __future__ import annotations

import logging

from gunicorn.glogging import Logger


class AccessAwareLogger(Logger):
    """A gunicorn ``Logger`` whose access log is on only when its logger would emit a line."""

    @property
    def access_log_enabled(self) -> bool:
        """Return gunicorn's answer, and no when ``gunicorn.access`` drops INFO lines."""
        return bool(super().access_log_enabled) and self.access_log.isEnabledFor(logging.INFO)
