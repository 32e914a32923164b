"""Versioned SQL migrations, applied in order by falcon_svc.requestlog.migrate."""
