"""falcon-svc: a sentiment classifier behind a Falcon 4 WSGI app under gunicorn."""

__version__ = "0.1.0"
