"""The meinheld worker says so when the stock (unpatched) meinheld build is installed."""

from __future__ import annotations

import pytest

from falcon_svc import workers


class RecordingLog:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str, *args: object) -> None:
        self.warnings.append(message % args)


class Config:
    timeout = 30


def test_the_installed_meinheld_is_our_patched_build():
    from importlib import metadata

    assert metadata.version("meinheld") == workers.PATCHED_MEINHELD_VERSION, (
        "install meinheld with scripts/meinheld/install.sh (make venv does)"
    )


def test_check_config_warns_about_a_stock_build(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(workers.metadata, "version", lambda name: "1.0.2")
    log = RecordingLog()
    workers.MeinheldWorker.check_config(Config(), log)
    assert any("not our patched build" in warning for warning in log.warnings), log.warnings


def test_check_config_is_quiet_about_the_patched_build(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(workers.metadata, "version", lambda name: workers.PATCHED_MEINHELD_VERSION)
    log = RecordingLog()
    workers.MeinheldWorker.check_config(Config(), log)
    assert log.warnings == []
