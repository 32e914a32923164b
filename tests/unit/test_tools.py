"""tests/tools.py: a missing binary fails under CI (or FALCON_REQUIRE_TOOLS=1) and skips elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from tools import SYSTEM_DIRS, model_required, require_tool, skip_or_fail

MISSING = "falcon-no-such-binary"


@pytest.fixture
def no_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("FALCON_REQUIRE_TOOLS", raising=False)
    monkeypatch.delenv("FALCON_REQUIRE_MODEL", raising=False)


@pytest.mark.usefixtures("no_ci")
def test_a_missing_tool_skips_naming_the_package():
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install falcon-package"):
        require_tool(MISSING, "falcon-package")


@pytest.mark.usefixtures("no_ci")
@pytest.mark.parametrize(("name", "value"), [("CI", "true"), ("CI", "1"), ("FALCON_REQUIRE_TOOLS", "1")])
def test_a_missing_tool_fails_when_tools_are_required(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install falcon-package"):
        require_tool(MISSING, "falcon-package")


@pytest.mark.usefixtures("no_ci")
def test_ci_false_does_not_require_tools(monkeypatch):
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require_tool(MISSING, "falcon-package")


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_highest_version_in_extra_dirs_beats_a_link_on_path(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(executable(tmp_path / "path" / MISSING).parent))
    for version in ("9.6", "15"):
        executable(tmp_path / "pg" / version / "bin" / MISSING)
    found = require_tool(MISSING, "x", (str(tmp_path / "pg" / "*" / "bin"),))
    assert found == str(tmp_path / "pg/15/bin" / MISSING), "the package's own newest directory wins"
    assert require_tool(MISSING, "x") == str(tmp_path / "path" / MISSING), "then PATH"


def test_finds_sbin_tools_off_path(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    # ldconfig (libc-bin, essential) lives in sbin, which a non-root PATH lacks.
    found = Path(require_tool("ldconfig", "libc-bin"))
    assert str(found.parent) in SYSTEM_DIRS, found


@pytest.mark.usefixtures("no_ci")
@pytest.mark.parametrize(
    ("name", "value", "required"),
    [("CI", "true", True), ("FALCON_REQUIRE_MODEL", "1", True), ("FALCON_REQUIRE_MODEL", "0", False)],
)
def test_model_required_follows_ci_and_falcon_require_model(monkeypatch: pytest.MonkeyPatch, name, value, required):
    monkeypatch.setenv(name, value)
    assert model_required() is required


def test_skip_or_fail_fails_when_required_and_skips_otherwise():
    with pytest.raises(pytest.fail.Exception, match="why"):
        skip_or_fail("why", required=True)
    with pytest.raises(pytest.skip.Exception, match="why"):
        skip_or_fail("why", required=False)
