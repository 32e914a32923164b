"""Build the Falcon app: ``create_app`` wires what it is given; ``get_app`` reads the env.

gunicorn runs ``falcon_svc.app:get_app()`` in each worker, so every worker loads
its own model after the fork (no preload: thread pools and sockets of later
layers must never cross a fork).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import falcon

from falcon_svc import errors, metrics
from falcon_svc.access import InternalAccess, parse_networks
from falcon_svc.auth.keys import KeyStore
from falcon_svc.auth.middleware import APIKeyAuth
from falcon_svc.auth.served import keys_for_app
from falcon_svc.dependencies import Dependencies, build_redis_dependencies, build_request_log
from falcon_svc.inference import Classifier
from falcon_svc.lifecycle import LIFECYCLE, Lifecycle
from falcon_svc.logs import configure_logging
from falcon_svc.middleware import IdempotencyMiddleware, RequestContext
from falcon_svc.model import Model
from falcon_svc.readiness import Readiness
from falcon_svc.resources.health import LivenessResource, ReadinessResource
from falcon_svc.resources.infer import BatchInferResource, InferResource
from falcon_svc.resources.metrics import MetricsResource
from falcon_svc.resources.models import ModelsResource
from falcon_svc.resources.openapi import OpenAPIResource
from falcon_svc.resources.ui import DemoPageResource, DocsPageResource, StaticAssetResource, SwaggerAssetResource
from falcon_svc.resources.v2 import (
    V2InferResource,
    V2LiveResource,
    V2ModelResource,
    V2ReadyResource,
    V2ServerResource,
)
from falcon_svc.settings import Settings
from falcon_svc.startup import load_model_or_exit, load_other_versions, load_settings_or_exit
from falcon_svc.versions import ServedVersions

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    model: Model,
    *,
    dependencies: Dependencies | None = None,
    lifecycle: Lifecycle | None = None,
    worker_id: str | None = None,
    api_keys: KeyStore | None = None,
    other_versions: Mapping[str, Model] | None = None,
    active_version: str | None = None,
) -> falcon.App[falcon.Request, falcon.Response]:
    """Return the WSGI app serving ``model`` under ``settings``.

    Without ``dependencies`` the app runs on the model alone (no cache, no
    idempotency): what tests of the HTTP contract need. Without ``api_keys``
    every route is open; with them, the inference routes need a key.
    ``other_versions`` answer requests that name their version (OIP v2).
    """
    deps = dependencies or Dependencies()
    lifecycle = lifecycle or Lifecycle()
    worker_id = worker_id or f"{settings.instance_name}:{os.getpid()}"
    classifier = Classifier(model, deps.cache)
    versions = ServedVersions(classifier, other_versions or {}, active_version)
    readiness = Readiness(model, lifecycle, deps)
    access = InternalAccess(parse_networks(settings.metrics_allowed_networks))

    middleware: list[RequestContext | APIKeyAuth | IdempotencyMiddleware] = [
        RequestContext(
            worker_id,
            settings.access_log,
            deps.request_log,
            text_hmac_key=settings.log_text_hmac_key.encode() or None,
        )
    ]
    # NOTE: before idempotency, whose records are scoped by the client the key names.
    if api_keys is not None:
        middleware.append(APIKeyAuth(api_keys))
    if deps.idempotency is not None:
        middleware.append(IdempotencyMiddleware(deps.idempotency, settings))
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    app.set_error_serializer(errors.serialize_error)
    app.add_error_handler(Exception, errors.handle_unexpected)
    app.add_sink(errors.not_found_sink, "/")

    app.add_route("/infer", InferResource(classifier, settings, worker_id))
    app.add_route("/infer/batch", BatchInferResource(classifier, settings, worker_id))
    app.add_route("/healthz", LivenessResource())
    app.add_route("/readyz", ReadinessResource(readiness, access))
    app.add_route("/v1/models", ModelsResource(versions, access))
    app.add_route("/metrics", MetricsResource(access))
    app.add_route("/openapi.json", OpenAPIResource())
    app.add_route("/", DemoPageResource())
    app.add_route("/static/{asset}", StaticAssetResource())
    app.add_route("/docs", DocsPageResource())
    app.add_route("/docs/{asset}", SwaggerAssetResource())

    v2_ready = V2ReadyResource(readiness, versions)
    v2_model = V2ModelResource(versions)
    v2_infer = V2InferResource(versions, settings)
    app.add_route("/v2", V2ServerResource())
    app.add_route("/v2/health/live", V2LiveResource())
    app.add_route("/v2/health/ready", v2_ready)
    app.add_route("/v2/models/{name}", v2_model)
    app.add_route("/v2/models/{name}/ready", v2_ready)
    app.add_route("/v2/models/{name}/infer", v2_infer)
    app.add_route("/v2/models/{name}/versions/{version}", v2_model)
    app.add_route("/v2/models/{name}/versions/{version}/ready", v2_ready)
    app.add_route("/v2/models/{name}/versions/{version}/infer", v2_infer)

    metrics.MODEL_INFO.labels(model.name, model.version, model.kind, model.scorer).set(1)
    mix = expected_label_mix(model)
    for label, share in mix.items():
        metrics.MODEL_EXPECTED_LABEL_SHARE.labels(model.version, label).set(share)
    if not mix and model.kind != "dummy":  # NOTE: a dummy is already a DEGRADED warning
        logger.warning(
            "model %s records no label_mix (trained before 2026-12-02): the drift alert cannot watch it",
            model.version,
        )
    metrics.WORKER_START_TIME.set(time.time())
    metrics.DRAINING.set(0)
    return app


def get_app() -> falcon.App[falcon.Request, falcon.Response]:
    """Build the app from the environment: the zero-argument factory gunicorn runs."""
    configure_logging(os.environ.get("LOG_LEVEL", "info"))
    settings = load_settings_or_exit()
    configure_logging(settings.log_level)
    model = load_model_or_exit(settings)
    # NOTE: the keys the gunicorn master read (falcon_svc/auth/served.py), so all workers agree.
    api_keys = keys_for_app(settings)
    logger.info(
        "worker ready",
        extra={"model_version": model.version, "model_kind": model.kind, "scorer": model.scorer},
    )
    deps = Dependencies()
    build_redis_dependencies(settings, model.version, deps)
    if settings.request_log_enabled:
        build_request_log(settings, deps).start()
        # NOTE: gunicorn SIGKILLs a worker graceful_timeout after SIGTERM, and the
        # in-flight requests used part of that: the flush gets what is left (less
        # a margin), and spools whatever it cannot write in that time.
        LIFECYCLE.on_exit(lambda: deps.close(LIFECYCLE.seconds_left(settings.graceful_shutdown_timeout_seconds)))
    else:
        logger.warning("request log disabled (REQUEST_LOG_ENABLED=false): no request_log rows are written")
    return create_app(
        settings,
        model,
        dependencies=deps,
        lifecycle=LIFECYCLE,
        api_keys=api_keys,
        other_versions=load_other_versions(settings, model),
        active_version=active_version(settings),
    )


def active_version(settings: Settings) -> str | None:
    """Return the store's active version (None without a store: the served one is active)."""
    if not settings.model_store:
        return None
    from falcon_svc.model.store import ModelStore, StoreError

    try:
        return ModelStore(settings.model_store).active()
    except StoreError:
        return None


def expected_label_mix(model: Model) -> dict[str, float]:
    """Return the label shares ``model`` predicted on its evaluation set (metadata ``label_mix``), if recorded."""
    mix = model.metadata.get("label_mix")
    if not isinstance(mix, dict):
        return {}
    return {str(label): float(share) for label, share in mix.items() if isinstance(share, int | float)}
