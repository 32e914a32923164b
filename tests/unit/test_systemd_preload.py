"""The master imports libraries before forking, and nothing of ours."""

import importlib.metadata

from falcon_svc.systemd import PRELOADED_MODULES, preload_libraries


def test_only_third_party_libraries_are_preloaded() -> None:
    # Our modules create metrics, threads and pools at import or build time; those
    # must be created in each worker after the fork, never in the master.
    assert not [name for name in PRELOADED_MODULES if name.split(".")[0] == "falcon_svc"]
    distributions = importlib.metadata.packages_distributions()
    assert all(name.split(".")[0] in distributions for name in PRELOADED_MODULES)


def test_preload_imports_them_all() -> None:
    preload_libraries()
