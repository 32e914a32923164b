"""The ``falcon-svc models`` command: the model store from the operator's side.

``import DIR``, ``list``, ``show [VERSION]``, ``activate VERSION``, ``rollback`` and
``canary VERSION`` (falcon_svc/canary.py). The store is ``--store DIR``, else
MODEL_STORE from the environment, else from the service's env file (so an operator on
the host need not source it first). Activation swaps the ``active`` pointer; the
running units take it on a reload (``--reload``: ``systemctl reload`` unit by unit,
each waited for until it serves the new version).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from falcon_svc.rollout import RolloutError

if TYPE_CHECKING:
    from falcon_svc.model import Model
    from falcon_svc.model.store import ModelStore
    from falcon_svc.settings import Settings

SERVICE_ENV_FILE = Path("/etc/falcon-svc/falcon-svc.env")
logger = logging.getLogger("falcon_svc.models")


class CommandError(Exception):
    """A ``models`` command cannot go on; its message is the one line printed."""


def register(commands: Any) -> None:
    """Add ``models`` and its actions to the ``falcon-svc`` subcommands."""
    parser = commands.add_parser("models", help="the model store: versions, activation, rollback, canary")
    parser.add_argument("--store", type=Path, help="the store directory (default: MODEL_STORE)")
    parser.add_argument(
        "--env-file",
        type=Path,
        default=SERVICE_ENV_FILE,
        help=f"read settings not in the environment from this file (default: {SERVICE_ENV_FILE}, if readable)",
    )
    actions = parser.add_subparsers(dest="models_command", required=True)

    imported = actions.add_parser("import", help="verify an artifact directory and copy it into the store")
    imported.add_argument("directory", type=Path, metavar="DIR")
    imported.add_argument("--activate", action="store_true", help="then activate it (through the gate)")
    imported.add_argument(
        "--if-no-active", action="store_true", help="with --activate: only when the store has no active version yet"
    )
    add_gate_arguments(imported)
    add_reload_arguments(imported)
    imported.set_defaults(handler=import_command)

    listed = actions.add_parser("list", help="list the stored versions: active, previous and canary pins marked")
    listed.set_defaults(handler=list_command)

    shown = actions.add_parser("show", help="print a version's evaluation report, compared with the active one")
    shown.add_argument("version", nargs="?", help="default: the active version")
    shown.add_argument("--json", action="store_true", help="print the report as JSON")
    shown.set_defaults(handler=show_command)

    activate = actions.add_parser("activate", help="gate a version, then make it the active one")
    activate.add_argument("version")
    add_gate_arguments(activate)
    add_reload_arguments(activate)
    activate.set_defaults(handler=activate_command)

    rollback = actions.add_parser("rollback", help="make the previous version active again (no gate)")
    rollback.add_argument("--reason", default="", help="recorded in the store's history")
    add_reload_arguments(rollback)
    rollback.set_defaults(handler=rollback_command)

    from falcon_svc.canary import add_canary_command

    add_canary_command(actions)


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --force/--reason and the gate's knobs (shared with ``canary``)."""
    parser.add_argument("--force", action="store_true", help="activate even if the gate refuses (needs --reason)")
    parser.add_argument("--reason", default="", help="why (recorded in the store's history; required with --force)")
    parser.add_argument(
        "--gate-set",
        action="append",
        default=[],
        metavar="NAME=FILE.csv",
        help="score both versions on this label,text CSV too (repeatable; default sets: the shipped dev set)",
    )


def add_reload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reload", action="store_true", help="then reload the worker units, one at a time")
    parser.add_argument(
        "--ports", type=port_list, help="the units to reload, e.g. 8001,8002 (default: every active unit)"
    )


# --- commands -------------------------------------------------------------------------
def import_command(args: argparse.Namespace) -> int:
    def run() -> None:
        from falcon_svc.model.signing import load_public_keys

        settings = command_settings(args)
        store = open_store(args, settings)
        version = store.import_artifact(args.directory, load_public_keys(settings.model_public_key))
        print(f"imported {version} into {store.root}")
        if args.activate and not (args.if_no_active and store.active() is not None):
            activate_version(store, settings, version, args)

    return run_command("import", run)


def list_command(args: argparse.Namespace) -> int:
    def run() -> None:
        store = open_store(args, command_settings(args))
        for line in list_lines(store):
            print(line)

    return run_command("list", run)


def show_command(args: argparse.Namespace) -> int:
    def run() -> None:
        import json

        from falcon_svc.training.report import load_report
        from falcon_svc.training.report_text import render_report

        store = open_store(args, command_settings(args))
        version = args.version or store.active()
        if version is None:
            raise CommandError(f"the store {store.root} has no active version; name one (falcon-svc models list)")
        report = load_report(store.version_dir(version))
        if report is None:
            raise CommandError(
                f"version {version} has no evaluation report (trained before reports existed, or a dummy)"
            )
        active = store.active()
        compare_to = load_report(store.version_dir(active)) if active and active != version else None
        print(json.dumps(report, indent=2, sort_keys=True) if args.json else render_report(report, compare_to))

    return run_command("show", run)


def activate_command(args: argparse.Namespace) -> int:
    def run() -> None:
        settings = command_settings(args)
        activate_version(open_store(args, settings), settings, args.version, args)

    return run_command("activate", run)


def rollback_command(args: argparse.Namespace) -> int:
    def run() -> None:
        settings = command_settings(args)
        store = open_store(args, settings)
        old = store.active()
        version = store.rollback(reason=args.reason)
        logger.warning("model rolled back from %s to %s (%s)", old, version, args.reason or "no reason given")
        print(f"active: {version} (was {old})")
        reload_if_asked(store, args)

    return run_command("rollback", run)


# --- the steps ------------------------------------------------------------------------
def activate_version(store: ModelStore, settings: Settings, version: str, args: argparse.Namespace) -> None:
    """Gate ``version`` against the active one, activate it, and reload if asked."""
    if args.force and not args.reason:
        raise CommandError("--force needs --reason: say why the gate is overridden (it is recorded)")
    if store.active() == version:
        print(f"{version} is already the active version")
        reload_if_asked(store, args)
        return
    result = run_gate(store, settings, version, gate_sets(args.gate_set))
    print(result.table())
    if not result.passed:
        for reason in result.reasons:
            print(f"gate: {reason}")
        if not args.force:
            raise CommandError(f"refusing to activate {version}: the gate failed (override with --force --reason)")
        logger.warning(
            "gate overridden: activating %s despite %s (--force: %s)", version, "; ".join(result.reasons), args.reason
        )
    old = store.activate(version, reason=args.reason, forced=args.force and not result.passed)
    print(f"active: {version} (was {old or 'none'})")
    try:
        reload_if_asked(store, args)
    except RolloutError as ex:
        if old is None:
            raise
        # NOTE: a version that loads as root but not in a worker would leave the unit's
        # gunicorn respawning failing workers: put the old version back on every unit.
        store.activate(old, reason=f"automatic: {version} did not come up after the reload ({ex})")
        print(f"reverting to {old}: {ex}", file=sys.stderr)
        reload_if_asked(store, args)
        raise CommandError(f"{version} was not rolled out: {ex}; {old} is active and served again") from ex


def run_gate(store: ModelStore, settings: Settings, version: str, sets: Mapping[str, Path] | None) -> Any:
    """Load the candidate and the active version (verified) and score both on the gate sets."""
    from falcon_svc.training.gate import check_gate

    candidate = load_version(store, settings, version)
    active_version = store.active()
    active = load_version(store, settings, active_version) if active_version else None
    return check_gate(
        candidate,
        active,
        tolerance=settings.model_gate_tolerance_points / 100,
        behaviour_floor=settings.model_behaviour_floor_percent / 100,
        sets=sets,
    )


def load_version(store: ModelStore, settings: Settings, version: str) -> Model:
    """Load a stored version as a worker would (signature checked with MODEL_PUBLIC_KEY)."""
    from falcon_svc.model import load_model
    from falcon_svc.model.signing import load_public_keys

    return load_model(
        store.version_dir(version),
        fast_path=settings.fast_path,
        public_keys=load_public_keys(settings.model_public_key),
    )


def gate_sets(values: list[str]) -> dict[str, Path] | None:
    """Return the default gate sets plus each NAME=FILE given (None: the defaults alone)."""
    if not values:
        return None
    from falcon_svc.training.gate import default_gate_sets

    sets = default_gate_sets()
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise CommandError(f"--gate-set {value!r}: expected NAME=FILE.csv")
        if not Path(path).is_file():
            raise CommandError(f"--gate-set {value!r}: {path} is not a file")
        sets[name] = Path(path)
    return sets


def reload_if_asked(store: ModelStore, args: argparse.Namespace) -> None:
    """With --reload, reload each unit and wait until it serves what the store says it should."""
    if not args.reload:
        print("the units serve the new version after a reload: systemctl reload 'falcon-worker@*'")
        return
    from falcon_svc.rollout import reload_and_wait, worker_ports

    ports = list(args.ports) if args.ports else worker_ports()
    if not ports:
        raise CommandError("no active falcon-worker@ unit to reload")

    def version_for(port: int) -> str:
        version = store.serving_version(port)
        if version is None:
            raise CommandError("the store has no active version")
        return version

    reload_and_wait(ports, version_for)


def list_lines(store: ModelStore) -> list[str]:
    """Return the ``list`` table: version, when trained, its main metric, and its roles."""
    from falcon_svc.model.artifact import ModelLoadError

    active, previous, pins = store.active(), store.previous(), store.pins()
    lines = [f"{'':2}{'version':<22} {'trained_at':<26} {'kind':<21} {'accuracy':>8}  roles"]
    for version in store.versions():
        try:
            metadata = store.metadata(version)
        except ModelLoadError as ex:
            lines.append(f"  {version:<22} unreadable: {ex}")
            continue
        roles = [role for role, held in (("active", version == active), ("previous", version == previous)) if held]
        roles += [f"canary on :{port}" for port, pinned in sorted(pins.items()) if pinned == version]
        lines.append(
            f"{'*' if version == active else ' '} {version:<22} {metadata.get('trained_at', '?')!s:<26} "
            f"{metadata.get('kind', '?')!s:<21} {main_accuracy(metadata):>8}  {', '.join(roles)}"
        )
    if len(lines) == 1:
        lines.append(f"  (the store {store.root} is empty: falcon-svc models import DIR)")
    return lines


def main_accuracy(metadata: Mapping[str, Any]) -> str:
    """Return the accuracy on the version's main evaluation set, as recorded at training."""
    metrics = metadata.get("metrics") or {}
    # NOTE: the set training called main (report.MAIN_SET_PREFERENCE), else any.
    for name in (metadata.get("label_mix_set"), "held_out", "tweet_test", *metrics):
        entry = metrics.get(name) if name else None
        if isinstance(entry, dict) and isinstance(entry.get("model"), dict):
            return f"{entry['model'].get('accuracy', 0):.4f}"
        if isinstance(entry, dict) and "accuracy" in entry:
            return f"{entry['accuracy']:.4f}"
    return "-"


# --- plumbing -------------------------------------------------------------------------
def command_settings(args: argparse.Namespace) -> Settings:
    """Return settings from the environment, completed by the service's env file if readable."""
    from falcon_svc.settings import Settings, SettingsError

    environ = dict(os.environ)
    env_file: Path = args.env_file
    if os.access(env_file, os.R_OK):
        for key, value in read_env_file(env_file).items():
            environ.setdefault(key, value)
    try:
        return Settings.from_env(environ)
    except SettingsError as ex:
        raise CommandError(f"invalid configuration: {ex}") from ex


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a systemd EnvironmentFile's KEY=VALUE lines (comments and blanks skipped, quotes removed)."""
    values = {}
    for raw in path.read_text("utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def open_store(args: argparse.Namespace, settings: Settings) -> ModelStore:
    from falcon_svc.model.store import ModelStore

    root = args.store or (Path(settings.model_store) if settings.model_store else None)
    if root is None:
        raise CommandError("no model store: pass --store DIR or set MODEL_STORE")
    return ModelStore(root)


def port_list(text: str) -> tuple[int, ...]:
    """Parse ``--ports 8001,8002`` (an argparse type, shared with ``canary``): distinct TCP ports."""
    try:
        ports = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as ex:
        raise argparse.ArgumentTypeError(f"expected ports like 8001,8002, got {text!r}") from ex
    if not ports or any(not 1 <= port <= 65535 for port in ports) or len(set(ports)) != len(ports):
        raise argparse.ArgumentTypeError(f"expected distinct ports like 8001,8002, got {text!r}")
    return ports


def run_command(name: str, run: Callable[[], None]) -> int:
    """Run a command body; print one line and return 1 on an expected failure."""
    from falcon_svc.model.artifact import ModelLoadError
    from falcon_svc.model.signing import PublicKeyError
    from falcon_svc.model.store import StoreError
    from falcon_svc.training.report import ReportError

    expected = (CommandError, StoreError, ModelLoadError, PublicKeyError, RolloutError, ReportError, OSError)
    try:
        run()
    except (*expected, ValueError) as ex:
        print(f"falcon-svc models {name}: {ex}", file=sys.stderr)
        return 1
    return 0
