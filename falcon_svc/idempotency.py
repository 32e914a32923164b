"""``X-Idempotency-Key``: a retried POST gets the first answer, never a second computation.

The first request with a key claims it in Redis (``SET NX`` with a short lock
TTL) and, once answered with a 2xx, stores its response with a fingerprint of the
request (method, path, media type, canonical body) for ``IDEMPOTENCY_TTL_SECONDS``.
A key is scoped per route and per client (``scoped_key``): the same key on another
route, or from another client, is another key. Later, under the same scoped key:

- same key, same fingerprint, stored: the stored response, as it was, with
  ``Idempotent-Replayed: true``;
- same key, other fingerprint (another body, or the same body with another
  Content-Type): 422, nothing computed;
- same key while the first is still in flight: 409 with ``Retry-After: 1``
  (chosen over waiting: a sync worker that waits holds a whole process); but
  nginx's own retry of the same client request (the unit it first went to died
  mid-request, SIGKILL or OOM, after claiming the key) takes the claim over, by
  nginx's per-request id (``attempt``): the client sent the request once, and
  must not get a 409 for a retry it never made;
- Redis down or its breaker open: the request proceeds without idempotency, and
  ``Idempotency-Status: unavailable`` plus a metric say so.

A record Redis evicts (``maxmemory`` reached under an ``allkeys-*`` policy) is
simply gone: a duplicate of a pending request, or a retry of a completed one, is
computed again. Only a Redis that never evicts these records (``noeviction``, in
an instance of their own) makes the guarantee hold; docs/RUNBOOK.md says how.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import falcon
import redis

from falcon_svc import metrics
from falcon_svc.errors import APIError
from falcon_svc.logs import LogThrottle
from falcon_svc.resilience import Attempt, CircuitBreaker, guarded_call

logger = logging.getLogger(__name__)

HEADER = "X-Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
STATUS_HEADER = "Idempotency-Status"
# Response headers a replay must carry to be read as the original was.
REPLAYED_RESPONSE_HEADERS = ("Inference-Header-Content-Length",)
_VALID_KEY = re.compile(r"[\x21-\x7e]{1,255}")
# NOTE: no ":" in a client scope, so "<route>:<client>:<key>" cannot be read two ways
# (the key, last, may hold ":"; the route is a hex digest).
_VALID_CLIENT_SCOPE = re.compile(r"[A-Za-z0-9._-]{0,64}")
# NOTE: "idem2" since 2026-12, when keys became scoped per route and client and the
# fingerprint took in the media type. Records under the old "falcon:idem:<key>" are
# never read again: they expire within IDEMPOTENCY_TTL_SECONDS (24 h), so a retry
# that straddles the deploy is computed once more. A new prefix rather than a new
# segment under the old one, so no old client-chosen key can look like a new key.
KEY_PREFIX = "falcon:idem2"
# Anything else a Redis call raises is a bug, and propagates.
_REDIS_ERRORS = (redis.RedisError,)
# One warning per minute at most for answers Redis did not store (IdempotencyStore.complete).
_UNRECORDED_LOG = LogThrottle(60.0)

# Claim the key if free (returns nil), else return what is stored: one round trip.
# A pending claim made by an earlier attempt at this very client request (ARGV[3]:
# nginx's request id, the same on each unit nginx tries; ARGV[4]: the fingerprint)
# is taken over too: that attempt's unit failed, or nginx would not have retried.
# NOTE: only a pending record is decoded (json.dumps keeps "state" first): a done one
# may hold a 256 KiB answer, and decoding it on every replay would cost Redis's thread.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
local current = redis.call('GET', KEYS[1])
if ARGV[3] ~= '' and current and string.find(current, '{"state": "pending"', 1, true) == 1 then
  local ok, record = pcall(cjson.decode, current)
  if ok and type(record) == 'table' and record['state'] == 'pending'
      and record['attempt'] == ARGV[3] and record['fp'] == ARGV[4] then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
    return false
  end
end
return current
"""
# Store the response only if the claim is still ours (it may have expired).
_COMPLETE = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['token'] == ARGV[2] then
  return redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
end
return false
"""
# NOTE: only a pending claim is freed: a completion that timed out on our side
# may have been applied by Redis all the same, and its answer must stay.
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current then
  local record = cjson.decode(current)
  if record['token'] == ARGV[1] and record['state'] == 'pending' then return redis.call('DEL', KEYS[1]) end
end
return 0
"""


class Outcome(Enum):
    FIRST = "first"
    REPLAYED = "replayed"
    CONFLICT = "conflict"
    MISMATCH = "mismatch"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Claim:
    """What ``begin`` decided, and what the caller needs to finish or replay."""

    outcome: Outcome
    key: str = ""
    fingerprint: str = ""
    token: str = ""
    stored: dict[str, Any] | None = None


def validate_key(value: str) -> str:
    """Return the key if it is 1 to 255 visible ASCII characters, else raise a 400."""
    if not _VALID_KEY.fullmatch(value):
        raise APIError(
            falcon.HTTP_400,
            "invalid_idempotency_key",
            f"{HEADER} must be 1 to 255 visible ASCII characters (no spaces).",
            field=HEADER,
        )
    return value


def scoped_key(path: str, client_scope: str, key: str) -> str:
    """Return the client's key as stored: scoped per route and per client.

    Scoped, so that the same key on /infer and /infer/batch is two independent
    requests, and so that one client can neither read another's stored answer nor
    squat a key another will use. ``client_scope`` is the API key's id
    (``req.context.client_id``, set by ``falcon_svc.auth``); empty with API keys off.

    Raises:
        ValueError: ``client_scope`` is not 0 to 64 of ``A-Z a-z 0-9 . _ -``
            (it comes from our authentication, never from the request as sent).
    """
    if not _VALID_CLIENT_SCOPE.fullmatch(client_scope):
        raise ValueError(f"client scope {client_scope[:80]!r} is not 0 to 64 of A-Z a-z 0-9 . _ -")
    route = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{route}:{client_scope}:{key}"


def media_type(content_type: str | None) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Return ``content_type`` normalised: the type and parameter names lowercased, parameters sorted.

    Quotes around a value and the case of ``charset`` do not change what a body
    means, so they do not change the fingerprint; no Content-Type at all is ``("", ())``.
    A tuple rather than a string, so no parameter value can pass for another parameter.
    """
    if not content_type:
        return "", ()
    value, params = falcon.parse_header(content_type)
    normalised = {name.lower(): (v.lower() if name.lower() == "charset" else v) for name, v in params.items()}
    return value.strip().lower(), tuple(sorted(normalised.items()))


def fingerprint(
    method: str, path: str, content_type: str | None, body: bytes, *, header_length: str | None = None
) -> str:
    """Hash the request: what it asks for, and how its body is to be read.

    The media type counts (the same bytes as another type are another request),
    and so does ``Inference-Header-Content-Length`` (``header_length``), which
    says where an OIP binary body's JSON ends. A body that is wholly JSON is hashed
    canonically (key order and spacing do not matter); a binary-extension body,
    or one that is not JSON, as its bytes.
    """
    canonical = body if header_length is not None else _canonical_json(body)
    # NOTE: the fields as one JSON array, so no path (percent-decoded, it may hold a
    # newline) can run into the media type.
    fields = [method, path, media_type(content_type), header_length]
    digest = hashlib.sha256(json.dumps(fields, ensure_ascii=True).encode())
    digest.update(b"\n")
    digest.update(canonical)
    return digest.hexdigest()


def _canonical_json(body: bytes) -> bytes:
    """Return a JSON body with sorted keys and no spacing; any other body as it is."""
    try:
        return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body


def judge(existing: bytes | str, request_fingerprint: str, redis_key: str = "") -> Claim:
    """Decide what a request meets under a key someone already claimed, from the record stored there.

    A record this code cannot read (another writer, a format we no longer know)
    is not a reason to refuse the request: it proceeds without idempotency.
    """
    try:
        record = json.loads(existing)
        stored_fingerprint, state = record["fp"], record["state"]
    except (ValueError, KeyError, TypeError):
        logger.warning("idempotency record under %s is unreadable; proceeding without idempotency", redis_key)
        return Claim(Outcome.UNAVAILABLE)
    if stored_fingerprint != request_fingerprint:
        return Claim(Outcome.MISMATCH, redis_key)
    if state == "pending":
        return Claim(Outcome.CONFLICT, redis_key)
    return Claim(Outcome.REPLAYED, redis_key, stored=record)


class IdempotencyStore:
    """Claim, complete and replay idempotency keys in Redis, behind a breaker."""

    def __init__(
        self,
        client: redis.Redis | None,
        breaker: CircuitBreaker,
        *,
        ttl_seconds: int,
        lock_seconds: int,
        prefix: str = KEY_PREFIX,
    ) -> None:
        self._client = client
        self._breaker = breaker
        self._ttl = ttl_seconds
        self._lock = lock_seconds
        self._prefix = prefix
        if client is not None:
            self._claim = client.register_script(_CLAIM)
            self._complete = client.register_script(_COMPLETE)
            self._release = client.register_script(_RELEASE)
        # NOTE: bound once: .labels() takes a lock and a dict lookup per call.
        self._claim_latency = metrics.DEPENDENCY_LATENCY.labels("redis", "idempotency_claim")

    def begin(self, key: str, request_fingerprint: str, attempt_of: str = "") -> Claim:
        """Claim ``key`` (already scoped: ``scoped_key``) or report what is already stored under it.

        ``attempt_of`` names the client request this is an attempt at (nginx's request
        id, ``req.context.proxy_log_id``): a claim still pending under the same name
        and fingerprint was made by an attempt nginx gave up on, and is taken over.
        """
        if self._client is None:
            return self._unavailable()
        token = os.urandom(8).hex()
        record = {"state": "pending", "fp": request_fingerprint, "token": token}
        if attempt_of:
            record["attempt"] = attempt_of
        pending = json.dumps(record)
        redis_key = f"{self._prefix}:{key}"
        attempt = guarded_call(
            self._breaker,
            lambda: self._claim(keys=[redis_key], args=[pending, self._lock, attempt_of, request_fingerprint]),
            errors=_REDIS_ERRORS,
            latency=self._claim_latency,
        )
        if not attempt.ok:
            return self._unavailable()
        if attempt.value is None:
            return self._counted(Claim(Outcome.FIRST, redis_key, request_fingerprint, token))
        return self._counted(judge(attempt.value, request_fingerprint, redis_key))

    def complete(self, claim: Claim, status: int, body: bytes, headers: dict[str, str]) -> None:
        """Store the response of a claimed request; a failure only costs the replay.

        ``headers`` are replayed as they are (the request id, the content type and,
        for OIP binary tensors, ``Inference-Header-Content-Length``).
        """
        stored: dict[str, Any] = {
            "state": "done",
            "fp": claim.fingerprint,
            "token": claim.token,
            "status": status,
            "headers": headers,
        }
        try:
            stored["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            # An OIP reply with binary tensors; JSON cannot hold its bytes as they are.
            stored["body_base64"] = base64.b64encode(body).decode("ascii")
        record = json.dumps(stored)
        if self._quietly(lambda: self._complete(keys=[claim.key], args=[record, claim.token, self._ttl])).ok:
            return
        # NOTE: the claim would answer 409 to every retry for IDEMPOTENCY_LOCK_SECONDS;
        # freed, a retry runs again (the same answer: classification has no side effect
        # but its log row). Counted and said, thinned under load.
        release = self._quietly(lambda: self._release(keys=[claim.key], args=[claim.token]))
        # NOTE: 0 from the script: no pending claim of ours; the completion got through after all.
        released = release.ok and release.value == 1
        metrics.IDEMPOTENCY.labels("unrecorded").inc()
        events = _UNRECORDED_LOG.admit()
        if events is not None:
            if released:
                fate = "freed: a retry runs again"
            elif release.ok:
                fate = "not pending: Redis stored the answer after all, and a retry is replayed"
            else:
                fate = "left pending: a retry gets 409 until IDEMPOTENCY_LOCK_SECONDS"
            logger.warning(
                "idempotency: %d answers whose storing in Redis failed; the last one's claim %s", events, fate
            )

    def release(self, claim: Claim) -> None:
        """Free a claim whose request failed, so the client may retry it."""
        self._quietly(lambda: self._release(keys=[claim.key], args=[claim.token]))

    def _quietly(self, call: Callable[[], object]) -> Attempt[object]:
        """Make one bounded Redis call; a failure is recorded on the breaker and returned, never raised."""
        # NOTE: not refused by an open breaker: a claim left pending would answer
        # 409 for IDEMPOTENCY_LOCK_SECONDS, and one bounded call is cheap.
        return guarded_call(self._breaker, call, errors=_REDIS_ERRORS, ask_breaker=False)

    def _unavailable(self) -> Claim:
        return self._counted(Claim(Outcome.UNAVAILABLE))

    @staticmethod
    def _counted(claim: Claim) -> Claim:
        metrics.IDEMPOTENCY.labels(claim.outcome.value).inc()
        return claim
