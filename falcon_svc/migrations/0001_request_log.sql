-- 0001: the request log, one row per answered request (written by falcon_svc.requestlog).
-- NOTE: request_id is the primary key so that the writer and spool replays can use
-- ON CONFLICT DO NOTHING: a row is stored exactly once however often it is retried.
CREATE TABLE request_log (
    request_id        text PRIMARY KEY,
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
    text_sha256       text,
    -- NOTE: the raw text only when LOG_REQUEST_TEXT=true (off by default, for privacy).
    text              text NULL
);

COMMENT ON TABLE request_log IS 'One row per answered request; raw text only when LOG_REQUEST_TEXT=true.';

-- Runbook queries ("the last N minutes", "errors since T", "traffic per model
-- version since T") all bound received_at. Rows arrive in time order, so a BRIN
-- index serves them at a fraction of a B-tree's write cost: every index is paid
-- on each of thousands of inserts a second, and the PRIMARY KEY is the only
-- B-tree the writer needs.
CREATE INDEX request_log_received_at_brin ON request_log USING brin (received_at);
