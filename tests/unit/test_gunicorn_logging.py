"""gunicorn's access log counts as on only when its logger would write the line."""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger

from falcon_svc.gunicorn_logging import AccessAwareLogger


@pytest.fixture
def conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    # NOTE: importing the config sets PROMETHEUS_MULTIPROC_DIR; keep that out of the other tests.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.delitem(sys.modules, "falcon_svc.gunicorn_conf", raising=False)
    return importlib.import_module("falcon_svc.gunicorn_conf")


def logger(logger_class: type[Logger], logconfig_dict: dict[str, Any]) -> Logger:
    cfg = Config()
    cfg.set("logconfig_dict", logconfig_dict)
    return logger_class(cfg)


def test_our_config_uses_the_class(conf):
    assert conf.logger_class == f"{AccessAwareLogger.__module__}.{AccessAwareLogger.__name__}"


def test_the_dropped_access_log_is_off_where_gunicorn_counts_it_on(conf):
    assert logger(Logger, conf.logconfig_dict).access_log_enabled, "upstream: any logconfig_dict turns it on"
    assert not logger(AccessAwareLogger, conf.logconfig_dict).access_log_enabled


def test_an_operator_who_sets_the_access_logger_to_info_gets_it_back(conf):
    config = copy.deepcopy(conf.logconfig_dict)
    config["loggers"]["gunicorn.access"]["level"] = "INFO"
    assert logger(AccessAwareLogger, config).access_log_enabled
