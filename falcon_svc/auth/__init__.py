"""API keys: the key file and store (``keys``), which keys are served (``served``),
the middleware that checks them (``middleware``) and ``falcon-svc keys`` (``commands``).

NOTE: the package imports neither the middleware nor the metrics: the gunicorn
master imports ``served`` and must not create metric files before its workers fork.
"""
