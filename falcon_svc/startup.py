"""Start-up policy: what stops the service before it serves, with which exit code.

Distinct exit codes (sysexits.h) let systemd's RestartPreventExitStatus= stop a
restart loop that no restart would fix. This module imports nothing heavy: the
gunicorn config imports it before the metrics directory is set up.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from falcon_svc.settings import Settings, SettingsError

if TYPE_CHECKING:
    from falcon_svc.model import Model

logger = logging.getLogger("falcon_svc.app")

EXIT_CONFIG = 78  # EX_CONFIG: a setting is invalid, or what it names is not installed
EXIT_NO_MODEL = 66  # EX_NOINPUT: the model artifact is missing, corrupt or refused


def check_worker_class_or_exit(settings: Settings) -> None:
    """Exit ``EXIT_CONFIG`` with one line if the configured worker class cannot be imported.

    meinheld is optional (built by scripts/meinheld/install.sh); without this check
    gunicorn would print a traceback per start and systemd would retry forever.
    """
    if settings.worker_class != "meinheld":
        return
    try:
        import meinheld  # noqa: F401
    except ImportError as ex:
        logger.critical(
            "WORKER_CLASS=meinheld but meinheld is not installed (%s): install it with "
            "scripts/meinheld/install.sh, or set WORKER_CLASS=sync",
            ex,
            extra={"exit_code": EXIT_CONFIG},
        )
        sys.exit(EXIT_CONFIG)


def load_settings_or_exit() -> Settings:
    """Return settings from the environment, or log one line and exit ``EXIT_CONFIG``."""
    try:
        return Settings.from_env()
    except SettingsError as ex:
        logger.critical("invalid configuration: %s", ex, extra={"exit_code": EXIT_CONFIG})
        sys.exit(EXIT_CONFIG)


def load_model_or_exit(settings: Settings) -> Model:
    """Return the configured model, or log one line and exit ``EXIT_NO_MODEL``.

    With MODEL_PUBLIC_KEY the artifact must be signed by one of its keys (checked
    before unpickling); an unreadable key file is a configuration error (``EXIT_CONFIG``).
    """
    # NOTE: imported here, in the worker: the gunicorn master imports this module
    # too and has no use for scikit-learn.
    from falcon_svc.model import ModelLoadError, load_model
    from falcon_svc.model.artifact import UNAUTHENTICATED
    from falcon_svc.model.signing import PublicKeyError, SignatureError, load_public_keys

    try:
        public_keys = load_public_keys(settings.model_public_key)
    except PublicKeyError as ex:
        logger.critical("invalid configuration: MODEL_PUBLIC_KEY: %s", ex, extra={"exit_code": EXIT_CONFIG})
        sys.exit(EXIT_CONFIG)
    model_dir = serving_model_dir_or_exit(settings)
    try:
        model = load_model(model_dir, fast_path=settings.fast_path, public_keys=public_keys)
    except ModelLoadError as ex:
        # NOTE: retraining cannot fix a signature; the message says what would.
        hint = "" if isinstance(ex, SignatureError) else " (train it with: make model)"
        logger.critical(
            "cannot load the model from %s: %s%s",
            model_dir,
            ex,
            hint,
            extra={"exit_code": EXIT_NO_MODEL},
        )
        sys.exit(EXIT_NO_MODEL)
    signature = model.metadata["signature"]
    if signature == UNAUTHENTICATED:
        logger.warning(
            "model in %s is not authenticated: MODEL_PUBLIC_KEY is unset, so only its sha256 is checked",
            model_dir,
        )
    else:
        logger.info("model in %s: signature %s", model_dir, signature)
    if model.kind == "dummy":
        if not settings.allow_dummy_model:
            logger.critical(
                "the model in %s is the dummy model and ALLOW_DUMMY_MODEL=false",
                model_dir,
                extra={"exit_code": EXIT_NO_MODEL},
            )
            sys.exit(EXIT_NO_MODEL)
        logger.warning(
            "DEGRADED: serving the DUMMY model from %s; its predictions are not meaningful "
            "(install the training data and run: make model)",
            model_dir,
        )
    if settings.fast_path and model.scorer != "compiled":
        logger.warning("fast path failed verification; serving with scikit-learn predict_proba")
    return model


def serving_model_dir_or_exit(settings: Settings) -> Path:
    """Return the directory of the model this process serves: MODEL_DIR, or the store's pick for its port.

    With MODEL_STORE the pointer is read once, here: the version directory it names
    never changes, so a pointer swapped during the load cannot mix two versions.
    """
    if not settings.model_store:
        return settings.model_dir
    from falcon_svc.model.store import ModelStore, StoreError

    store = ModelStore(settings.model_store)
    try:
        version = store.serving_version(settings.bind_port)
        if version is None:
            raise StoreError(
                f"the store {settings.model_store} has no active version (import and activate one: "
                "falcon-svc models import DIR --activate)"
            )
        return store.version_dir(version)
    except StoreError as ex:
        logger.critical("MODEL_STORE: %s", ex, extra={"exit_code": EXIT_NO_MODEL})
        sys.exit(EXIT_NO_MODEL)


def load_other_versions(settings: Settings, serving: Model) -> dict[str, Model]:
    """Return the store's active and previous versions besides ``serving``, by version.

    They answer requests that name their version (``/v2/models/sentiment/versions/V/infer``).
    One that fails to load is logged and left out: the served model is what matters.
    """
    if not settings.model_store:
        return {}
    from falcon_svc.model import ModelLoadError, load_model
    from falcon_svc.model.signing import PublicKeyError, load_public_keys
    from falcon_svc.model.store import ModelStore, StoreError

    store = ModelStore(settings.model_store)
    others: dict[str, Model] = {}
    try:
        public_keys = load_public_keys(settings.model_public_key)
        wanted = [store.active(), store.previous()]
    except (PublicKeyError, StoreError) as ex:
        logger.warning("not loading other model versions: %s", ex)
        return others
    for version in wanted:
        if version is None or version == serving.version or version in others:
            continue
        try:
            others[version] = load_model(
                store.version_dir(version), fast_path=settings.fast_path, public_keys=public_keys
            )
        except (ModelLoadError, StoreError) as ex:
            logger.warning("model version %s stays unloaded: %s", version, ex)
    return others
