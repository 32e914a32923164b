"""The docs name only things that exist: make targets, repository paths and anchors,
systemd units, settings, metrics and Ansible variables.

README.md and docs/*.md are read as Markdown: names are taken from code (inline spans,
indented or fenced blocks) and links, where a doc names something exactly; plain prose
is left alone, except for falcon_* metric names and upper-case setting names, which are
unambiguous anywhere. Each finder is a pure function of a text, so the tests at the end
prove that a broken doc is caught.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from metric_names import metric_series
from prometheus_client.metrics import MetricWrapperBase

from falcon_svc import metrics
from falcon_svc.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
ROLES_DIR = REPO_ROOT / "ansible" / "roles"
E2E_SCRIPT = REPO_ROOT / "scripts" / "e2e.sh"
DEPLOYMENT_GUIDE = REPO_ROOT / "docs" / "UBUNTU_DEPLOYMENT.md"
HEALTH_SCRIPT = REPO_ROOT / "scripts" / "check_health.sh"

# Relative paths are looked up from the repository root, and from ansible/: the
# deployment guide runs its commands there after `cd ansible` (`roles/...`, `site.yml`).
PATH_BASES = (REPO_ROOT, REPO_ROOT / "ansible")
# A code token with a slash is a repository path when it starts with one of the
# repository's top-level entries or ansible/'s, or ends in one of these extensions.
SOURCE_SUFFIXES = {".sh", ".py", ".md", ".yml", ".yaml", ".j2", ".sql", ".json", ".csv", ".ini", ".cfg", ".toml"}
# The deployment guide copies scripts/faults/ to falcon-faults/ on the host.
PATH_ALIASES = {"falcon-faults/": "scripts/faults/"}
# Paths the docs name that are not in the repository, each for a reason.
NOT_IN_REPO = {
    "host_vars/falcon-01.yml": "the deployment guide has the reader create it (step 3)",
}

# Units that the roles do not start by name but the docs rightly name.
EXTRA_UNITS = {
    "postgresql@": "Debian's postgresql-common template: postgresql@VERSION-CLUSTER runs the server behind postgresql",
}
# Environment variables read by tools, not by falcon-svc or our scripts.
EXTERNAL_VARIABLES = {
    "REDISCLI_AUTH": "redis-cli takes the Redis password from it (keeps it off the command line)",
    "NOTIFY_SOCKET": "systemd's sd_notify socket (falcon_svc/systemd.py)",
    "WATCHDOG_USEC": "systemd's watchdog interval (falcon_svc/systemd.py)",
    "REDIS_PASSWORD": "prometheus-redis-exporter's password, in its environment file (roles/exporters)",
    "REQUEST_ID": "a journal field of each worker line: journalctl REQUEST_ID=... (docs/RUNBOOK.md)",
    "SYSLOG_IDENTIFIER": "journald's field that `journalctl -t` matches (falcon-svc events, falcon-access lines)",
    "ERROR_CODE": "a journal field of a worker's access line for a 4xx/5xx answer (falcon_svc/journal.py)",
}
# Role-prefixed names that are variables when they are Ansible's, and only then.
ANSIBLE_PREFIXES = ("common_", "redis_", "postgresql_", "falcon_svc_", "nginx_", "node_exporter_", "exporters_")
ANSIBLE_PREFIXES += ("prometheus_", "grafana_", "vault_")

UNIT_VERBS_WITH_ARGUMENT = {"-p", "--property", "-t", "--type", "-s", "--signal", "-n", "--lines", "-o", "--output"}
SHELL_BREAK = re.compile(r"^(?:\||\|\||&&|;|#.*|>.*|<.*|\)|\$\(.*)$")
UNIT_SHAPE = re.compile(r"^[A-Za-z0-9][\w@.*:$\\-]*$")
UPPER_NAME = re.compile(r"(?<![\w$/.-])([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)(?![\w-]|\.[a-z])")
# `NAME=value command ...`: a setting handed to a command (not a shell variable `NAME=$(...)`).
ENV_PREFIX = re.compile(r"^([A-Z][A-Z0-9_]*)=(?!\$\()\S*\s+\S")
RECORDING_RULE = re.compile(r"(?<![\w:])([a-z_]+:[a-zA-Z0-9_]+:[a-zA-Z0-9_]+)")
PACKAGE_REF = re.compile(r"(?<![\w/.])falcon_svc((?:\.[A-Za-z_]\w*)*)(?![\w/])")
FALCON_NAME = re.compile(r"(?<![\w/.:-])(falcon_[a-z0-9_]+)(?![\w/:-]|\.[a-z])")
METRIC_COUNT = re.compile(r"(\d+) `falcon_\*` metrics")


# --- Reading Markdown -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Doc:
    """One Markdown file split into what it says in code, in links, and in prose."""

    path: Path
    code_lines: list[str]  # lines of indented or fenced code blocks
    spans: list[str]  # inline `code`
    links: list[str]  # [text](target) targets
    text: str

    @property
    def code(self) -> list[str]:
        return self.code_lines + self.spans


def parse(text: str, path: Path = REPO_ROOT / "README.md") -> Doc:
    """Split Markdown into code block lines, inline code spans, link targets."""
    code_lines, prose = [], []
    fenced = False
    previous_blank_or_code = True
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        indented = line.startswith("    ") and line.strip() and previous_blank_or_code
        if fenced or indented:
            code_lines.append(line.strip())
            previous_blank_or_code = True
        else:
            prose.append(line)
            previous_blank_or_code = not line.strip()
    prose_text = "\n".join(prose)
    spans = re.findall(r"`([^`\n]+)`", prose_text)
    without_spans = re.sub(r"`[^`\n]+`", "", prose_text)
    links = re.findall(r"\]\(([^)\s]+)\)", without_spans)
    return Doc(path, code_lines, spans, links, text)


def load(path: Path) -> Doc:
    return parse(path.read_text(encoding="utf-8"), path)


def words(line: str) -> list[str]:
    """Shell-ish words of a code line, quotes stripped."""
    return [word.strip("'\"") for word in re.split(r"\s+", line.strip()) if word]


def brace_expand(token: str) -> list[str]:
    """`scripts/{a,b}.sh` -> scripts/a.sh, scripts/b.sh (one level, as the docs use it)."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", token)
    if not match:
        return [token]
    return [token[: match.start()] + part + token[match.end() :] for part in match.group(1).split(",")]


def github_anchor(heading: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors_of(markdown: str) -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in markdown.splitlines() if re.match(r"^#{1,6} ", line)}


# --- What exists ------------------------------------------------------------------------


def make_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z0-9][\w.-]*)\s*:(?!=)", text, re.MULTILINE))


def top_level_names() -> set[str]:
    """Top-level entries of the repository and of ansible/ (tracked files only)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    names = {name.split("/")[0] for name in listed}
    names |= {name.split("/")[1] for name in listed if name.startswith("ansible/") and name.count("/") >= 1}
    return names


def metric_families() -> set[str]:
    return {value._name for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)}


def recording_rules() -> set[str]:
    rules = set()
    for path in (REPO_ROOT / "prometheus" / "rules").glob("*.yml"):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            rules.update(rule["record"] for rule in group["rules"] if "record" in rule)
    return rules


def exporter_metrics() -> set[str]:
    """Metric names the rules and dashboards query (the exporters' included)."""
    texts = [p.read_text(encoding="utf-8") for p in (REPO_ROOT / "prometheus" / "rules").glob("*.yml")]
    texts += [p.read_text(encoding="utf-8") for p in (REPO_ROOT / "grafana" / "dashboards").glob("*.json")]
    return {name for text in texts for name in re.findall(r"\b([a-z][a-z0-9]*_[a-z0-9_]+)\b", text)}


def ansible_variables() -> set[str]:
    """Variables the roles and group_vars define, and the names their defaults give
    (such as the PostgreSQL role `falcon_owner`)."""
    names: set[str] = set()
    for path in [*ROLES_DIR.glob("*/defaults/main.yml"), *ROLES_DIR.glob("*/vars/main.yml")]:
        defaults = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        names.update(defaults)
        names.update(v for v in defaults.values() if isinstance(v, str) and re.fullmatch(r"[a-z][a-z0-9_]*", v))
    for path in (REPO_ROOT / "ansible" / "group_vars").glob("*.yml"):
        names.update(yaml.safe_load(path.read_text(encoding="utf-8")))
    names.update(inventory_names())
    for path in ROLES_DIR.glob("*/meta/argument_specs.yml"):
        names.update(yaml.safe_load(path.read_text(encoding="utf-8"))["argument_specs"]["main"]["options"])
    return names


def inventory_names() -> set[str]:
    """The groups and host variables of the example inventory, its commented fleet too.

    Docs name the layout's groups (`falcon_app`) and the host variable each fleet host
    sets on its line (`falcon_private_address`): the inventory is where they exist.
    """
    text = (REPO_ROOT / "ansible" / "inventory.example.ini").read_text(encoding="utf-8")
    groups = re.findall(r"^[#\s]*\[([a-z][a-z0-9_]*)(?::children)?\]", text, re.MULTILINE)
    host_variables = re.findall(r"\s([a-z][a-z0-9_]*)=", text)
    return set(groups) | set(host_variables)


def _tasks(path: Path) -> Iterator[dict]:
    for task in yaml.safe_load(path.read_text(encoding="utf-8")) or []:
        yield task
        for key in ("block", "rescue", "always"):
            yield from task.get(key, [])


def role_units() -> set[str]:
    """Units the roles manage by name (systemd_service tasks and handlers), `.service` dropped."""
    units = set()
    for path in [*ROLES_DIR.glob("*/tasks/*.yml"), *ROLES_DIR.glob("*/handlers/*.yml")]:
        for task in _tasks(path):
            module = task.get("ansible.builtin.systemd_service") or {}
            name = module.get("name")
            if not name:
                continue
            loop = derived_loop(task.get("loop"))
            items = loop if "{{ item }}" in name and isinstance(loop, list) else [None]
            for item in items:
                unit = name.replace("{{ item }}", str(item)) if item is not None else name
                units.add(re.sub(r"@\{\{.*?\}\}", "@", unit).removesuffix(".service"))
    return units


def derived_loop(loop: object) -> object:
    """Resolve a loop over a role's derived list to that list at the role's defaults."""
    if loop == "{{ _exporters_names }}":
        defaults = yaml.safe_load((ROLES_DIR / "exporters" / "defaults" / "main.yml").read_text(encoding="utf-8"))
        return [f"prometheus-{name}-exporter" for name in defaults["exporters_enabled"]]
    return loop


def repo_units() -> set[str]:
    return {path.name.removesuffix(".service") for path in (REPO_ROOT / "systemd").iterdir()}


def known_units() -> set[str]:
    return role_units() | repo_units() | set(EXTRA_UNITS)


def script_variables() -> set[str]:
    """Environment variables our scripts, the test harness and the Makefile read."""
    names = set()
    # tests/*.py: the switches the suite itself reads (CI, FALCON_REQUIRE_MODEL, ...).
    scripts = [*REPO_ROOT.glob("scripts/**/*.sh"), *REPO_ROOT.glob("scripts/**/*.py"), *REPO_ROOT.glob("tests/*.py")]
    for path in [*scripts, *REPO_ROOT.glob("scripts/**/*.lua")]:
        text = path.read_text(encoding="utf-8")
        names.update(re.findall(r"\$\{([A-Z][A-Z0-9_]*)(?::?[-=?+])", text))
        names.update(re.findall(r"environ(?:\.get\(|\[)\"([A-Z][A-Z0-9_]*)\"", text))
        names.update(re.findall(r"os\.getenv\(\"([A-Z][A-Z0-9_]*)\"\)", text))  # wrk's Lua scripts
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    names.update(re.findall(r"^([A-Z][A-Z0-9_]*)\s*[?:]?=", makefile, re.MULTILINE))
    return names


def settings_names() -> set[str]:
    env_example = (REPO_ROOT / ".env.example").read_text(encoding="utf-8")
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", env_example, re.MULTILINE))
    return documented | {field.name.upper() for field in dataclasses.fields(Settings)}


def known_variables() -> set[str]:
    return settings_names() | script_variables() | set(EXTERNAL_VARIABLES)


def e2e_ports() -> list[int]:
    match = re.search(r"^PORTS=\((.*)\)$", E2E_SCRIPT.read_text(encoding="utf-8"), re.MULTILINE)
    assert match, f"no PORTS=(...) line in {E2E_SCRIPT}"
    text = match.group(1).replace('"$SSH_PORT"', "2222")
    ssh_port = re.search(r"^SSH_PORT=(\d+)$", E2E_SCRIPT.read_text(encoding="utf-8"), re.MULTILINE)
    assert ssh_port and ssh_port.group(1) == "2222", "SSH_PORT in scripts/e2e.sh is no longer 2222: update this test"
    return sorted(int(port) for port in text.split())


def port_list(text: str) -> list[int]:
    """Ports in a prose list such as `80, 5432, 8001-8002` (ranges expanded)."""
    ports = []
    for first, last in re.findall(r"\b(\d{2,5})(?:-(\d{2,5}))?\b", text):
        ports.extend(range(int(first), int(last or first) + 1))
    return sorted(ports)


# --- Finders: each returns the names a doc gets wrong -------------------------------------


def unknown_make_targets(doc: Doc, targets: set[str]) -> set[str]:
    found = set()
    for code in doc.code:
        for match in re.finditer(r"(?<![\w-])make((?:\s+[a-z0-9][\w-]*)+)", code):
            found.update(match.group(1).split())
    return found - targets


def as_repo_path(word: str, top_names: set[str]) -> str | None:
    """The repository path a code word names, or None when it names none."""
    path = word.strip("(),;:`")
    if path.startswith("../") and not path.startswith("../.."):
        path = path[3:]  # the deployment guide's commands run in ansible/
    if "/" not in path or re.match(r"^(?:/|~|\.\.|\$|[a-z]+://|-)", path) or "=" in path:
        return None
    for alias, target in PATH_ALIASES.items():
        if path.startswith(alias):
            path = target + path[len(alias) :]
    if path.split("/")[0] in top_names or Path(path.split("#")[0]).suffix in SOURCE_SUFFIXES:
        return path
    return None


def path_tokens(doc: Doc, top_names: set[str]) -> Iterator[str]:
    for code in doc.code:
        for word in words(code):
            path = as_repo_path(word, top_names)
            if path is not None:
                yield from brace_expand(path)


def missing_paths(doc: Doc, top_names: set[str]) -> set[str]:
    missing = set()
    for token in path_tokens(doc, top_names):
        path = token.split("#")[0]
        if path in NOT_IN_REPO:
            continue
        pattern = re.sub(r"<[^>]*>|\{[^}]*\}", "*", path).rstrip("/")
        if not any(any(base.glob(pattern)) if "*" in pattern else (base / pattern).exists() for base in PATH_BASES):
            missing.add(token)
    return missing


def broken_links(doc: Doc) -> set[str]:
    broken = set()
    for target in doc.links:
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.path.parent / file_part).resolve() if file_part else doc.path
        if not path.exists():
            broken.add(target)
        elif anchor and path.suffix == ".md":
            text = doc.text if path == doc.path else path.read_text(encoding="utf-8")
            if anchor not in anchors_of(text):
                broken.add(target)
    return broken


def systemctl_units(args: list[str]) -> Iterator[str]:
    """The unit arguments of `systemctl VERB ...` / `systemd-analyze VERB ...` (after the tool)."""
    verb_seen = skip = False
    for word in args:
        if SHELL_BREAK.match(word):
            return
        if skip:
            skip = False
        elif word in UNIT_VERBS_WITH_ARGUMENT:
            skip = True
        elif word.startswith("-"):
            continue
        elif not verb_seen:
            verb_seen = True
        elif UNIT_SHAPE.match(word):
            yield word


def unit_tokens(doc: Doc) -> Iterator[str]:
    for code in doc.code:
        parts = words(re.sub(r"(?:^|\s)#.*$", "", code))  # a comment is prose
        for i, part in enumerate(parts):
            rest = parts[i + 1 :]
            if part in ("systemctl", "systemd-analyze"):
                yield from systemctl_units(rest)
            elif part == "journalctl":
                yield from (rest[j + 1] for j, word in enumerate(rest[:-1]) if word in ("-u", "--unit"))
        yield from re.findall(r"[\w@.*-]+\.(?:service|target)\b", code)
        yield from re.findall(r"falcon-worker@[\w$*.{}-]*", code)


def unknown_units(doc: Doc, units: set[str]) -> set[str]:
    unknown = set()
    for token in unit_tokens(doc):
        name = token.strip("'\"").removesuffix(".service")
        if name.endswith("@.service") or name.endswith("@"):
            key = name.removesuffix(".service")
        elif "@" in name:
            key = name.split("@")[0] + "@"
        else:
            key = name
        if key not in units:
            unknown.add(token)
    return unknown


def unknown_variables(doc: Doc, known: set[str]) -> set[str]:
    found = set(UPPER_NAME.findall(doc.text))
    for code in doc.code:
        match = ENV_PREFIX.match(code)
        if match:
            found.add(match.group(1))
    return found - known


def falcon_names(text: str) -> tuple[set[str], set[str], set[str], set[str]]:
    """Split falcon_* names into (recording rules, package refs, Ansible vars, metrics)."""
    rules = set(RECORDING_RULE.findall(text))
    text = RECORDING_RULE.sub(" ", text)
    packages = {"falcon_svc" + suffix for suffix in PACKAGE_REF.findall(text)}
    text = PACKAGE_REF.sub(" ", text)
    names = set(FALCON_NAME.findall(text))
    variables = {name for name in names if name.startswith("falcon_svc_")}
    return rules, packages, variables, names - variables


def unknown_falcon_names(doc: Doc) -> set[str]:
    rules, packages, variables, names = falcon_names(doc.text)
    unknown = {rule for rule in rules if "falcon_" in rule} - recording_rules()
    for package in packages:
        module = package.split(".")
        if len(module) > 1 and not any(
            (REPO_ROOT / Path(*module[:n])).with_suffix(".py").exists() or (REPO_ROOT / Path(*module[:n])).is_dir()
            for n in range(2, len(module) + 1)
        ):
            unknown.add(package)
    unknown |= variables - ansible_variables()
    unknown |= names - metric_series() - ansible_variables()  # falcon_owner is a PostgreSQL role
    return unknown


def unknown_ansible_variables(doc: Doc) -> set[str]:
    candidates = {
        span for span in doc.spans if re.fullmatch(r"[a-z][a-z0-9_]*", span) and span.startswith(ANSIBLE_PREFIXES)
    }
    return candidates - ansible_variables() - exporter_metrics() - metric_series()


# --- The docs -----------------------------------------------------------------------------

DOC_IDS = [str(path.relative_to(REPO_ROOT)) for path in DOCS]


@pytest.fixture(scope="module")
def top_names() -> set[str]:
    return top_level_names()


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_every_make_target_named_exists(path: Path) -> None:
    unknown = unknown_make_targets(load(path), make_targets())
    assert not unknown, f"{path.name} names make targets the Makefile does not have: {sorted(unknown)}"


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_every_repository_path_named_exists(path: Path, top_names: set[str]) -> None:
    missing = missing_paths(load(path), top_names)
    assert not missing, f"{path.name} names repository paths that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_every_link_and_anchor_resolves(path: Path) -> None:
    broken = broken_links(load(path))
    assert not broken, f"{path.name} links to missing files or headings: {sorted(broken)}"


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_every_systemd_unit_named_is_installed_by_the_roles(path: Path) -> None:
    unknown = unknown_units(load(path), known_units())
    assert not unknown, f"{path.name} names units neither systemd/ nor the roles provide: {sorted(unknown)}"


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_every_setting_named_exists(path: Path) -> None:
    unknown = unknown_variables(load(path), known_variables())
    assert not unknown, (
        f"{path.name} names settings that neither falcon_svc/settings.py, .env.example nor the scripts "
        f"read: {sorted(unknown)}"
    )


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_every_falcon_metric_rule_and_module_named_exists(path: Path) -> None:
    unknown = unknown_falcon_names(load(path))
    assert not unknown, (
        f"{path.name} names falcon_* metrics, recording rules, modules or Ansible variables that do not "
        f"exist (metrics: falcon_svc/metrics.py; rules: prometheus/rules/): {sorted(unknown)}"
    )


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_every_ansible_variable_named_exists(path: Path) -> None:
    unknown = unknown_ansible_variables(load(path))
    assert not unknown, f"{path.name} names Ansible variables no role defines: {sorted(unknown)}"


def test_the_metric_count_in_the_readme_is_right() -> None:
    counts = METRIC_COUNT.findall((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    assert counts, "README.md no longer says how many falcon_* metrics there are: update this test"
    assert {int(n) for n in counts} == {len(metric_families())}, (
        f"README.md says {counts} falcon_* metrics; falcon_svc/metrics.py declares {len(metric_families())}"
    )


def test_the_port_lists_agree_with_e2e_sh() -> None:
    ports = e2e_ports()
    guide = DEPLOYMENT_GUIDE.read_text(encoding="utf-8")
    match = re.search(r"the ports listed in `scripts/e2e.sh`\s+\(([^)]*)\)", guide)
    assert match, "docs/UBUNTU_DEPLOYMENT.md no longer lists the e2e ports as this test expects"
    assert port_list(match.group(1)) == ports, (
        f"docs/UBUNTU_DEPLOYMENT.md lists ports {port_list(match.group(1))}; scripts/e2e.sh PORTS is {ports}"
    )
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    comment = re.search(r"((?:^#.*\n)+)^e2e-up:", makefile, re.MULTILINE)
    assert comment, "no comment block above the e2e-up target in the Makefile"
    listed = port_list(re.sub(r"\bDebian \d+\b", "", comment.group(1)))
    assert listed in ([], ports), f"the Makefile's e2e comment lists ports {listed}; scripts/e2e.sh PORTS is {ports}"


def test_check_health_covers_every_unit_the_roles_start() -> None:
    script = HEALTH_SCRIPT.read_text(encoding="utf-8")
    listed = set()
    for name in ("SERVICE_UNITS", "OPTIONAL_UNITS"):
        match = re.search(rf"^{name}=\(([^)]*)\)", script, re.MULTILINE)
        assert match, f"no {name}=(...) in {HEALTH_SCRIPT.name}"
        listed.update(match.group(1).split())
    # The workers and the target are found at run time (falcon-svc.target's instances).
    expected = role_units() - {"falcon-worker@", "falcon-svc.target"}
    assert expected <= listed, f"{HEALTH_SCRIPT.name} does not check units the roles start: {sorted(expected - listed)}"
    assert listed <= expected, f"{HEALTH_SCRIPT.name} checks units no role starts: {sorted(listed - expected)}"


def test_no_file_points_outside_the_repository() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    offenders = []
    for name in listed:
        path = REPO_ROOT / name
        if path == Path(__file__) or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if "../shared" in text:
            offenders.append(name)
    assert not offenders, f"files that point outside the repository (../shared): {offenders}"


# --- The finders catch a broken doc ---------------------------------------------------------


def _readme() -> str:
    return (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_a_renamed_make_target_is_caught() -> None:
    broken = parse(_readme().replace("`make bench`", "`make benchmark`"))
    assert unknown_make_targets(broken, make_targets()) == {"benchmark"}


def test_a_wrong_path_and_a_wrong_anchor_are_caught(top_names: set[str]) -> None:
    text = _readme() + "\nSee `scripts/bench_modle.py` and [the runbook](docs/RUNBOOK.md#no-such-section).\n"
    broken = parse(text)
    assert missing_paths(broken, top_names) == {"scripts/bench_modle.py"}
    assert broken_links(broken) == {"docs/RUNBOOK.md#no-such-section"}


def test_a_wrong_unit_setting_metric_and_variable_are_caught() -> None:
    text = (
        "    systemctl restart falcon-workers@8001 redis\n"
        "    journalctl -u postgres -n 5\n\n"
        "Set `MAX_BODY_SIZE` and watch `falcon_http_request_seconds_bucket` and "
        "`job:falcon_http_requests:rate1m`; raise `falcon_svc_worker_count` or `nginx_rate_limits`.\n"
    )
    broken = parse(text)
    assert unknown_units(broken, known_units()) == {"falcon-workers@8001", "redis", "postgres"}
    assert unknown_variables(broken, known_variables()) == {"MAX_BODY_SIZE"}
    assert unknown_falcon_names(broken) == {
        "falcon_http_request_seconds_bucket",
        "job:falcon_http_requests:rate1m",
        "falcon_svc_worker_count",
    }
    assert unknown_ansible_variables(broken) == {"falcon_svc_worker_count", "nginx_rate_limits"}


def test_right_names_pass_the_finders(top_names: set[str]) -> None:
    text = (
        "    systemctl status --no-pager falcon-worker@8001 'falcon-worker@*' falcon-svc.target nginx\n"
        "    journalctl -u 'postgresql@*' -n 5 | tail\n"
        "    DURATION=10 bash scripts/bench/bench_http.sh\n\n"
        "`make e2e-up`, `scripts/faults/{stop_worker,kill_worker}.sh`, `falcon-faults/redis_down.sh`, "
        "`roles/<role>/meta/argument_specs.yml`, `MAX_BODY_BYTES`, "
        "`falcon_http_request_duration_seconds_bucket`, `instance:falcon_http_requests:rate5m`, "
        "`falcon_svc.workers.MeinheldWorker`, `falcon_svc_workers`, `redis_up`.\n"
    )
    doc = parse(text)
    found = (
        unknown_make_targets(doc, make_targets()),
        missing_paths(doc, top_names),
        unknown_units(doc, known_units()),
        unknown_variables(doc, known_variables()),
        unknown_falcon_names(doc),
        unknown_ansible_variables(doc),
    )
    assert found == (set(),) * 6


def test_every_finder_reads_every_doc() -> None:
    """Guard the parser: each doc yields code, and the README its usual kinds of names."""
    readme = load(REPO_ROOT / "README.md")
    assert any("make run" in code for code in readme.code)
    assert set(itertools.islice(path_tokens(readme, top_level_names()), 1)), "no path found in README.md"
    assert any(token.startswith("falcon-worker@") for token in unit_tokens(readme))
    for path in DOCS:
        assert load(path).code, f"{path.name}: the Markdown parser found no code at all"
