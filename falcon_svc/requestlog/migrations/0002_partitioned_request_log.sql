-- 0002: request_log becomes partitioned by day, its text digest becomes keyed, and it
-- records the client's API key id.
--
-- Why partitions: retention (falcon_svc/requestlog/retention.py, run daily by
-- falcon-svc-retention.timer) drops a whole day with DROP TABLE, which is instant,
-- takes no row locks, leaves no dead tuples for VACUUM and returns the space to the
-- file system at once; a DELETE of a day's rows would do none of that.
--
-- Layout: request_log is partitioned by RANGE (received_at), one partition per UTC
-- day, named request_log_YYYYMMDD, created ahead by `falcon-svc migrate` and by the
-- timer. request_log_default catches a row whose day has no partition yet (the timer
-- did not run for a week, a client clock far off): it is stored, never refused, and
-- the next `falcon-svc retention` moves it into its day's partition.
--
-- The primary key must contain the partition key, so it is (log_id, received_at).
-- A row keeps both values however often it is retried or replayed from the spool
-- (received_at is the request's own time.time(), stored in the row), so
-- ON CONFLICT (log_id, received_at) DO NOTHING still stores it exactly once.
--
-- Existing rows within the retention period are kept: they are copied into the new
-- table (they land in the default partition; `falcon-svc migrate` then creates today's
-- partition and the days ahead first, then moves the other days' rows into their
-- partitions, newest first, in the same run). Rows older than the retention period
-- are NOT copied: `falcon-svc migrate` sets falcon.request_log_keep_from (the first
-- kept day, from REQUEST_LOG_RETENTION_DAYS) for this session, so they are never
-- given partitions the next retention run would drop. Run by hand without that
-- setting, every row is copied. COST: the kept rows are read once and written twice
-- (copy, then move), under an ACCESS EXCLUSIVE lock on request_log for the duration
-- of this transaction: the workers' inserts fail meanwhile and their rows go to the
-- spool, replayed once the migration commits.

-- text_sha256 (an unkeyed sha256 of the text: a dictionary of short texts reverses
-- it) becomes text_hmac, an HMAC-SHA256 keyed with LOG_TEXT_HMAC_KEY. The old
-- digests are NOT copied: a column named text_hmac holding unkeyed hashes would
-- keep exactly the exposure this migration removes.

ALTER TABLE request_log RENAME TO request_log_0001;
ALTER INDEX request_log_pkey RENAME TO request_log_0001_pkey;
ALTER INDEX request_log_received_at_brin RENAME TO request_log_0001_received_at_brin;

CREATE TABLE request_log (
    log_id            text NOT NULL,
    request_id        text NOT NULL,
    received_at       timestamptz NOT NULL,
    route             text,
    method            text,
    status            smallint,
    worker_id         text,
    model_version     text,
    label             text NULL,
    confidence        double precision NULL,
    n_texts           integer,
    cache_hit         boolean,
    idempotent_replay boolean,
    latency_ms        double precision,
    text_length       integer,
    -- HMAC-SHA256 (hex) keyed with LOG_TEXT_HMAC_KEY; NULL when the key is unset.
    text_hmac         text NULL,
    -- NOTE: the raw text only when LOG_REQUEST_TEXT=true (off by default, for privacy).
    text              text NULL,
    -- The id of the API key that authenticated the request (never the key); NULL without one.
    client_key_id     text NULL,
    PRIMARY KEY (log_id, received_at)
) PARTITION BY RANGE (received_at);

COMMENT ON TABLE request_log IS
    'One row per answered request, one partition per UTC day (request_log_YYYYMMDD); '
    'raw text only when LOG_REQUEST_TEXT=true.';

CREATE TABLE request_log_default PARTITION OF request_log DEFAULT;

-- The BRIN index of 0001, now on every partition (created on each new one too).
CREATE INDEX request_log_received_at_brin ON request_log USING brin (received_at);

INSERT INTO request_log (
    log_id, request_id, received_at, route, method, status, worker_id, model_version, label,
    confidence, n_texts, cache_hit, idempotent_replay, latency_ms, text_length, text
)
SELECT
    log_id, request_id, received_at, route, method, status, worker_id, model_version, label,
    confidence, n_texts, cache_hit, idempotent_replay, latency_ms, text_length, text
FROM request_log_0001
WHERE received_at >= coalesce(
    nullif(current_setting('falcon.request_log_keep_from', true), '')::timestamptz, '-infinity'::timestamptz
);

DROP TABLE request_log_0001;
