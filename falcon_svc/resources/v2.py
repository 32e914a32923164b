"""Open Inference Protocol v2 routes: server and model metadata, health, infer.

The protocol itself (tensors in, tensors out, the binary extension) is
``falcon_svc.oip``; this module speaks HTTP around it. The body is JSON, sent
with no Content-Type (tritonclient sends none) or as application/json; with the
binary extension's ``Inference-Header-Content-Length`` header it may be
application/octet-stream too, and a binary reply is application/octet-stream
with that header.

Statuses: 400 for a body that breaks the protocol (JSON, binary framing,
``parameters``, ``outputs``), 422 for a tensor whose values break the contract
(header, shape, count, text limits: the same checks as /infer), 404 for another
model or version, 415 for another media type or a compressed body. Every error
body is OIP's ``{"error": "<message>"}`` (``errors.serialize_error``).
"""

from __future__ import annotations

from typing import Any

import falcon

import falcon_svc
from falcon_svc.errors import APIError
from falcon_svc.inference import Inference
from falcon_svc.oip import (
    ReplyEncoder,
    bad_request,
    binary_reply,
    client_id,
    decode_texts,
    model_metadata,
    requested_outputs,
)
from falcon_svc.readiness import Readiness
from falcon_svc.settings import Settings
from falcon_svc.tensors import BINARY_MEDIA_TYPE, HEADER_LENGTH_HEADER, TensorDataError, split_body
from falcon_svc.validation import parse_json, request_body, require_object
from falcon_svc.versions import ServedVersions

EXTENSIONS = ("binary_tensor_data",)
JSON_MEDIA_TYPES = ("", falcon.MEDIA_JSON)


class V2ServerResource:
    """``GET /v2``: server metadata."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"name": "falcon-svc", "version": falcon_svc.__version__, "extensions": list(EXTENSIONS)}


class V2LiveResource:
    """``GET /v2/health/live``."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"live": True}


class V2ReadyResource:
    """``GET /v2/health/ready`` and ``/v2/models/{name}[/versions/{version}]/ready``: 200 or 503.

    NOTE: OIP says any 4xx means "not ready"; 503 is kept, as on /readyz, so load
    balancers and probes read it as "send no traffic" (tritonclient only checks
    for 200). The body says why, in OIP's ``error`` key.
    """

    def __init__(self, readiness: Readiness, versions: ServedVersions) -> None:
        self._readiness = readiness
        self._versions = versions

    def on_get(
        self, req: falcon.Request, resp: falcon.Response, name: str | None = None, version: str | None = None
    ) -> None:
        if name is not None:
            self._versions.classifier(name, version)
        ready, detail = self._readiness.report()
        if ready:
            resp.media = {"ready": True}
            return
        resp.status = falcon.HTTP_503
        resp.media = {"ready": False, "error": f"Not ready: {', '.join(detail['reasons'])}."}


class V2ModelResource:
    """``GET /v2/models/{name}[/versions/{version}]``: the model's tensors and versions."""

    def __init__(self, versions: ServedVersions) -> None:
        self._versions = versions
        # NOTE: OIP's metadata has no "active" field; its free-form parameters say which
        # loaded version the unversioned routes serve and which the store marks active.
        roles = {"serving_version": versions.serving.model.version, "active_version": versions.active}
        self._bodies = {
            model.version: {
                **(body := model_metadata(model)),
                "versions": versions.versions(),
                "parameters": {**body["parameters"], **roles},
            }
            for model in versions.models()
        }

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str, version: str | None = None) -> None:
        resp.media = self._bodies[self._versions.classifier(name, version).model.version]


class V2InferResource:
    """``POST /v2/models/{name}[/versions/{version}]/infer``."""

    def __init__(self, versions: ServedVersions, settings: Settings) -> None:
        self._versions = versions
        self._settings = settings
        self._encoders = {model.version: ReplyEncoder(model) for model in versions.models()}

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str, version: str | None = None) -> None:
        classifier = self._versions.classifier(name, version)
        model = classifier.model
        body, binary = self._read(req)
        reply_id = client_id(body.get("id"))
        # The outputs first: checking them is cheap, normalising the texts is not.
        wanted = requested_outputs(body)
        texts = decode_texts(body, binary, self._settings.max_batch_size, self._settings.max_text_chars)
        results = classifier.classify(texts)
        req.context.inference = Inference(texts, results, model.version)
        reply, blobs = self._encoders[model.version].reply(
            reply_id or req.context.request_id, wanted, [result.prediction for result in results]
        )
        if not blobs:
            resp.media = reply
            return
        resp.data, header_length = binary_reply(reply, blobs)
        resp.content_type = BINARY_MEDIA_TYPE
        resp.set_header(HEADER_LENGTH_HEADER, str(header_length))

    def _read(self, req: falcon.Request) -> tuple[dict[str, Any], memoryview | None]:
        """Return the request's JSON object and, with the binary extension, the bytes after it."""
        header_length = req.get_header(HEADER_LENGTH_HEADER)
        _check_media_type(req, binary=header_length is not None)
        raw = request_body(req, self._settings.max_body_bytes)
        if header_length is None:
            return require_object(parse_json(raw)), None
        try:
            header, binary = split_body(raw, header_length)
        except TensorDataError as ex:
            raise bad_request(str(ex), HEADER_LENGTH_HEADER) from ex
        return require_object(parse_json(header)), binary


def _check_media_type(req: falcon.Request, *, binary: bool) -> None:
    """Raise a 415 unless the body is JSON (or binary-extension bytes) and not compressed."""
    media_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    if not (media_type in JSON_MEDIA_TYPES or (binary and media_type == BINARY_MEDIA_TYPE)):
        raise APIError(
            falcon.HTTP_415,
            "unsupported_media_type",
            f"Send the body as JSON (application/json or no Content-Type), or as {BINARY_MEDIA_TYPE} "
            f"with the {HEADER_LENGTH_HEADER} header (got {(req.content_type or '')[:80]}).",
        )
    encoding = req.get_header("Content-Encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        raise APIError(
            falcon.HTTP_415,
            "unsupported_media_type",
            f"Compressed request bodies are not supported (Content-Encoding: {encoding[:40]}); send them plain.",
        )
