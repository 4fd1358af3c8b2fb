-- batchd PostgreSQL schema, version 1: the same facts as the embedded SQLite schema (v3).
-- Every time is unix seconds (`*_at`) or unix milliseconds (`*_ms`, `*_expires`), as BIGINT;
-- lease, claim, heartbeat and delivery times come from the server's clock.

CREATE TABLE files (
    seq        BIGSERIAL PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    tenant     TEXT NOT NULL,
    bytes      BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    expires_at BIGINT,
    blob_key   TEXT NOT NULL
);
CREATE INDEX files_by_tenant ON files (tenant, seq);
CREATE INDEX files_by_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE batches (
    seq                  BIGSERIAL PRIMARY KEY,
    id                   TEXT NOT NULL UNIQUE,
    tenant               TEXT NOT NULL,
    idempotency_key      TEXT,
    -- The hash of the create request, beside its key: the key reused with another request
    -- is refused instead of answered with the first batch.
    idempotency_hash     TEXT,
    endpoint             TEXT NOT NULL,
    input_file_id        TEXT NOT NULL,
    completion_window    TEXT NOT NULL,
    metadata             TEXT,
    model                TEXT,
    status               TEXT NOT NULL,
    output_file_id       TEXT,
    error_file_id        TEXT,
    errors               TEXT,
    created_at           BIGINT NOT NULL,
    in_progress_at       BIGINT,
    expires_at           BIGINT,
    finalizing_at        BIGINT,
    completed_at         BIGINT,
    failed_at            BIGINT,
    expired_at           BIGINT,
    cancelling_at        BIGINT,
    cancelled_at         BIGINT,
    total                BIGINT NOT NULL DEFAULT 0,
    completed            BIGINT NOT NULL DEFAULT 0,
    failed               BIGINT NOT NULL DEFAULT 0,
    input_tokens         BIGINT NOT NULL DEFAULT 0,
    cached_tokens        BIGINT NOT NULL DEFAULT 0,
    output_tokens        BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens     BIGINT NOT NULL DEFAULT 0,
    total_tokens         BIGINT NOT NULL DEFAULT 0,
    priority             BIGINT NOT NULL DEFAULT 1,
    input_format         TEXT,
    output_expires_after BIGINT,
    finalize_as          TEXT,
    est_tokens           BIGINT NOT NULL DEFAULT 0,
    -- A batch step one node does alone (validation, finalization) is claimed on the row.
    claim_owner          TEXT,
    claim_expires        BIGINT,
    -- When the last batch.progress event was appended, to append at most one a second.
    last_progress_ms     BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX batches_by_tenant ON batches (tenant, seq);
CREATE INDEX batches_by_status ON batches (status);
CREATE INDEX batches_by_input ON batches (input_file_id);
CREATE INDEX batches_by_claim ON batches (claim_owner) WHERE claim_owner IS NOT NULL;
CREATE UNIQUE INDEX batches_by_idempotency_key ON batches (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE units (
    batch_id      TEXT NOT NULL,
    idx           BIGINT NOT NULL,
    first_line    BIGINT NOT NULL,
    end_line      BIGINT NOT NULL,
    line_count    BIGINT NOT NULL,
    byte_offset   BIGINT NOT NULL,
    byte_len      BIGINT NOT NULL,
    done          BIGINT NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    lease_expires BIGINT,
    epoch         BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX units_by_owner ON units (lease_owner) WHERE lease_owner IS NOT NULL;

-- The result log: one row per (batch, line), recorded once.
CREATE TABLE results (
    batch_id  TEXT NOT NULL,
    line      BIGINT NOT NULL,
    custom_id TEXT NOT NULL,
    ok        BOOLEAN NOT NULL,
    record    TEXT NOT NULL,
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX results_by_custom_id ON results (batch_id, custom_id);

CREATE TABLE nodes (
    id         TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    info       TEXT NOT NULL DEFAULT '{}'
);

-- Ids are handed out in commit order: every transaction that appends an event takes the
-- outbox's advisory lock first and holds it until it commits (see store::postgres::outbox).
CREATE TABLE events (
    id         BIGSERIAL PRIMARY KEY,
    tenant     TEXT NOT NULL,
    batch_id   TEXT NOT NULL,
    type       TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX events_by_batch ON events (batch_id, id);
CREATE INDEX events_by_tenant ON events (tenant, id);

CREATE TABLE webhook_deliveries (
    event_id        BIGINT PRIMARY KEY,
    state           TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | failed
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    claim_owner     TEXT,
    claim_expires   BIGINT
);
CREATE INDEX deliveries_due ON webhook_deliveries (next_attempt_ms) WHERE state = 'pending';

CREATE TABLE webhook_attempts (
    id          BIGSERIAL PRIMARY KEY,
    event_id    BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    status      BIGINT,
    error       TEXT,
    duration_ms BIGINT NOT NULL,
    delivered   BOOLEAN NOT NULL,
    retry_at_ms BIGINT
);
CREATE INDEX attempts_by_event ON webhook_attempts (event_id);

CREATE TABLE batch_usage (
    batch_id         TEXT NOT NULL,
    model            TEXT NOT NULL,
    hour             BIGINT NOT NULL,
    requests         BIGINT NOT NULL DEFAULT 0,
    input_tokens     BIGINT NOT NULL DEFAULT 0,
    cached_tokens    BIGINT NOT NULL DEFAULT 0,
    output_tokens    BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    total_tokens     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, model, hour)
);
