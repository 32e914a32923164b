"""Settings: defaults, parsing, and one clear message for each bad value."""

import dataclasses
import re
from pathlib import Path

import pytest

from falcon_svc.settings import Settings, SettingsError

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_environment():
    settings = Settings.from_env({})
    assert settings.bind == "127.0.0.1:8000"
    assert settings.workers == 2
    assert settings.max_text_chars == 5000 and settings.max_batch_size == 50
    assert settings.model_dir == Path("models/sentiment")


def test_values_are_parsed():
    settings = Settings.from_env(
        {
            "WORKERS": "4",
            "FAST_PATH": "off",
            "WORKER_CLASS": "GThread",
            "BIND": "unix:/run/x.sock",
            "LOG_LEVEL": "DEBUG",
        }
    )
    assert settings.workers == 4
    assert settings.fast_path is False
    assert settings.worker_class == "gthread"
    assert settings.gunicorn_worker_class == "falcon_svc.gunicorn_workers.ThreadWorker"
    assert settings.bind == "unix:/run/x.sock"
    assert settings.log_level == "debug"


def test_meinheld_maps_to_our_safe_worker():
    assert Settings.from_env({"WORKER_CLASS": "meinheld"}).gunicorn_worker_class == "falcon_svc.workers.MeinheldWorker"


def test_blank_value_means_default():
    assert Settings.from_env({"WORKERS": "  "}).workers == 2


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORKERS": "two"}, "WORKERS='two' is not an integer"),
        ({"WORKERS": "0"}, "WORKERS=0 is out of range"),
        ({"FAST_PATH": "maybe"}, "FAST_PATH='maybe' is not a boolean"),
        ({"WORKER_CLASS": "gevent"}, "WORKER_CLASS='gevent' is not one of sync, gthread, meinheld"),
        ({"BIND": "localhost"}, "BIND='localhost' must be HOST:PORT"),
        ({"BIND": "127.0.0.1:99999"}, "BIND='127.0.0.1:99999' must be HOST:PORT"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='loud' is not one of"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL='localhost:6379' must start with one of"),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL='mysql://x/y' must start with one of"),
    ],
)
def test_bad_values_name_the_key(env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        Settings.from_env(env)


def test_every_setting_is_documented_in_env_example():
    documented = set(re.findall(r"^#?\s*([A-Z_]+)=", (REPO_ROOT / ".env.example").read_text(), re.MULTILINE))
    keys = {field.name.upper() for field in dataclasses.fields(Settings)}
    assert keys <= documented, f"undocumented in .env.example: {sorted(keys - documented)}"
