"""Settings: defaults, parsing, and one clear message for each bad value."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from falcon_svc.settings import Settings, SettingsError, describe

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


def env_example_values() -> dict[str, str]:
    """Return the KEY=VALUE lines of .env.example that are set (not the commented-out examples)."""
    text = (REPO_ROOT / ".env.example").read_text()
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*?)\s*$", text, re.MULTILINE))


def test_env_example_values_are_the_defaults():
    """.env.example says "every key, its default": read through the service's own parser, each is the default."""
    listed = env_example_values()
    defaults = Settings.from_env({})
    from_example = Settings.from_env(listed)
    keys = {field.name.upper(): field.name for field in dataclasses.fields(Settings)}
    # NOTE: INSTANCE_NAME defaults to the host name, so .env.example can only show an example of it.
    unset = sorted(set(keys) - set(listed) - {"INSTANCE_NAME"})
    assert not unset, f".env.example shows no default for {unset}"
    differ = {
        key: (listed[key], getattr(defaults, name))
        for key, name in keys.items()
        if key in listed and getattr(from_example, name) != getattr(defaults, name)
    }
    assert not differ, f".env.example and Settings disagree (.env.example value, code default): {differ}"


def _claim(path: str, pattern: str) -> str:
    """Return what ``pattern``'s group captures in a document (whitespace and line breaks collapsed)."""
    text = " ".join((REPO_ROOT / path).read_text().split())
    match = re.search(pattern, text)
    assert match, f"{path} no longer says /{pattern}/: update the claim here or the document"
    return match[1]


def _mib(value: str) -> int:
    return int(value) * 2**20


def _seconds_in_ms(value: str) -> int:
    return int(value) * 1000


def _number(value: str) -> int:
    return int(value.replace(",", ""))


def _not(value: str) -> bool:
    """The document names the value that switches a default off (or on): the default is the other one."""
    return value != "true"


# (setting, document, what it says about the default, how to read the captured text)
DOCUMENTED_DEFAULTS = [
    ("bind", "README.md", r"serves on (\d+\.\d+\.\d+\.\d+:\d+)", str),
    ("workers", "README.md", r"starts gunicorn with (\d+) workers", int),
    ("worker_class", "README.md", r"the default is \*\*(\w+)\*\*", str),
    ("max_text_chars", "README.md", r"the limit is ([\d,]+) characters", _number),
    ("max_batch_size", "README.md", r"1 to (\d+) texts", int),
    ("max_body_bytes", "README.md", r"body over `MAX_BODY_BYTES` \((\d+) MiB\)", _mib),
    ("redis_timeout_ms", "README.md", r"Redis calls on the request path use (\d+) ms timeouts", int),
    ("circuit_breaker_failure_threshold", "README.md", r"open after (\d+) consecutive failures", int),
    ("circuit_breaker_timeout_seconds", "README.md", r"fail fast for (\d+) s, then one trial call", int),
    ("retry_max_attempts", "README.md", r"(?:retries transient errors|tries each write up to) (\d+) times", int),
    ("retry_base_delay_ms", "README.md", r"full jitter \((\d+) ms to \d+ s\)", int),
    ("retry_max_delay_ms", "README.md", r"full jitter \(\d+ ms to (\d+) s\)", _seconds_in_ms),
    ("fast_path", "README.md", r"`FAST_PATH=(false)` forces scikit-learn", _not),
    ("allow_dummy_model", "README.md", r"`ALLOW_DUMMY_MODEL=(false)` makes such a model refuse to start", _not),
    ("log_request_text", "README.md", r"the raw text only with `LOG_REQUEST_TEXT=(true)`", _not),
    ("request_log_enabled", "README.md", r"With `REQUEST_LOG_ENABLED=(false)` it neither migrates", _not),
    ("redis_timeout_ms", "docs/RUNBOOK.md", r"request-path calls time out at (\d+) ms", int),
    ("circuit_breaker_timeout_seconds", "docs/RUNBOOK.md", r"the breaker's (\d+) s open period", int),
    ("cache_redis_min_chars", "docs/RUNBOOK.md", r"`CACHE_REDIS_MIN_CHARS` \((\d+)\) characters", int),
    (
        "graceful_shutdown_timeout_seconds",
        "systemd/falcon-worker@.service",
        r"GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS \(default (\d+)\)",
        int,
    ),
]


@pytest.mark.parametrize(
    ("name", "path", "pattern", "read"),
    DOCUMENTED_DEFAULTS,
    ids=[f"{path}:{name}" for name, path, _, _ in DOCUMENTED_DEFAULTS],
)
def test_defaults_are_what_the_documents_state(name, path, pattern, read):
    """README.md (and the runbook, the unit) promise these defaults; Settings and .env.example must keep them."""
    documented = read(_claim(path, pattern))
    assert getattr(Settings(), name) == documented, f"{path} says {name} defaults to {documented!r}"
    key = name.upper()
    listed = env_example_values()
    assert key in listed, f".env.example does not set {key}"
    assert getattr(Settings.from_env({key: listed[key]}), name) == documented, (
        f".env.example sets {key}={listed[key]}, but {path} says {documented!r}"
    )


# --- Settings declared as fields: each key's rules come from its field ---------------------

FIELDS = dataclasses.fields(Settings)
TYPES = typing.get_type_hints(Settings)
INTEGERS = [field for field in FIELDS if TYPES[field.name] is int]
BOOLEANS = [field for field in FIELDS if TYPES[field.name] is bool]
CHOICES = [field for field in FIELDS if "choices" in field.metadata]


def test_defaults_read_back_through_the_parser():
    """Every field's annotation has a parser, and every default passes its own rules and checks."""
    defaults = Settings()
    assert Settings.from_env(describe(defaults)) == defaults


@pytest.mark.parametrize("field", INTEGERS, ids=lambda field: field.name)
def test_integer_settings_accept_their_bounds_and_nothing_past_them(field):
    key = field.name.upper()
    assert {"minimum", "maximum"} <= set(field.metadata), f"{key} is an integer without bounds"
    low, high = field.metadata["minimum"], field.metadata["maximum"]
    assert getattr(Settings.from_env({key: str(low)}), field.name) == low
    assert getattr(Settings.from_env({key: f" {high} "}), field.name) == high
    for outside in (low - 1, high + 1):
        with pytest.raises(SettingsError, match=re.escape(f"{key}={outside} is out of range [{low}, {high}]")):
            Settings.from_env({key: str(outside)})
    with pytest.raises(SettingsError, match=re.escape(f"{key}='1.5' is not an integer")):
        Settings.from_env({key: "1.5"})


@pytest.mark.parametrize("field", BOOLEANS, ids=lambda field: field.name)
def test_boolean_settings_take_both_spellings_and_refuse_others(field):
    key = field.name.upper()
    for raw, value in (("YES", True), ("on", True), ("1", True), ("No", False), ("off", False), ("0", False)):
        assert getattr(Settings.from_env({key: raw}), field.name) is value, f"{key}={raw}"
    with pytest.raises(SettingsError, match=re.escape(f"{key}='y' is not a boolean (use true or false)")):
        Settings.from_env({key: "y"})


@pytest.mark.parametrize("field", CHOICES, ids=lambda field: field.name)
def test_choice_settings_take_each_choice_in_any_case(field):
    key, allowed = field.name.upper(), field.metadata["choices"]
    assert TYPES[field.name] is str, f"{key}: choices apply to text settings only"
    for choice in allowed:
        assert getattr(Settings.from_env({key: choice.upper()}), field.name) == choice
    with pytest.raises(SettingsError, match=re.escape(f"{key}='nope' is not one of {', '.join(allowed)}")):
        Settings.from_env({key: "nope"})


def test_checks_run_after_every_key_has_parsed():
    """Two bad keys: a parse error wins over a check (BIND, URLs); checks go in field order."""
    with pytest.raises(SettingsError, match=r"^WORKERS="):
        Settings.from_env({"BIND": "nowhere", "WORKERS": "0"})
    with pytest.raises(SettingsError, match=r"^REDIS_URL="):
        Settings.from_env({"REDIS_URL": "x", "DATABASE_URL": "y"})


SECRET = "pw-0123456789"


@pytest.mark.parametrize(
    "env",
    [
        {"REDIS_URL": f"http://:{SECRET}@cache:6379/0"},
        {"DATABASE_URL": f"mysql://falcon:{SECRET}@db/falcon"},
        {"DATABASE_URL": f"host=db user=falcon password={SECRET}"},
    ],
)
def test_a_bad_url_is_named_without_its_password(env):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)
    (key,) = env
    assert key in str(raised.value), raised.value
    assert SECRET not in str(raised.value), f"the error message shows the password: {raised.value}"


def test_describe_hides_url_passwords():
    settings = Settings.from_env(
        {"REDIS_URL": f"redis://:{SECRET}@cache:6379/0", "DATABASE_URL": f"postgresql://falcon:{SECRET}@db/falcon"}
    )
    described = describe(settings)
    assert SECRET not in repr(described), f"describe() shows a password: {described}"
    assert described["redis_url"] == "redis://:***@cache:6379/0", described
    assert described["database_url"] == "postgresql://falcon:***@db/falcon", described


@pytest.mark.parametrize("value", ["10.0.0.0/8", "127.0.0.1/32, ::1/128", "192.168.7.0/24,fd00::/8"])
def test_metrics_allowed_networks_takes_cidr_lists(value):
    assert Settings.from_env({"METRICS_ALLOWED_NETWORKS": value}).metrics_allowed_networks == value


@pytest.mark.parametrize("value", ["10.0.0.1/8", "localhost", "10.0.0.0/33", "127.0.0.0/8;::1/128"])
def test_metrics_allowed_networks_refuses_what_is_not_a_network(value):
    with pytest.raises(SettingsError, match="METRICS_ALLOWED_NETWORKS="):
        Settings.from_env({"METRICS_ALLOWED_NETWORKS": value})


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://falcon:ab%zz{SECRET}@db/falcon",  # libpq would quote the raw password
        f"postgresql://falcon:{SECRET}@[db/falcon",
        f"postgresql://falcon:{SECRET}@db/falcon?nosuchoption=1",
    ],
)
def test_a_database_url_libpq_cannot_read_is_refused_without_its_password(url):
    with pytest.raises(SettingsError, match="DATABASE_URL=") as raised:
        Settings.from_env({"DATABASE_URL": url})
    assert SECRET not in str(raised.value), f"the error message shows the password: {raised.value}"
    assert raised.value.__cause__ is None and raised.value.__suppress_context__, "libpq's message rides along"


@pytest.mark.parametrize(("raw", "mode"), [("true", "all"), ("FALSE", "off"), ("errors", "errors")])
def test_access_log_takes_its_modes_and_the_booleans_it_once_was(raw, mode):
    assert Settings.from_env({"ACCESS_LOG": raw}).access_log == mode
