-- batchd embedded schema, version 3: claims, fenced leases on the store's clock, nodes, the
-- event outbox, webhook deliveries and usage per model.

-- Leases now expire by the store's clock in unix milliseconds, and carry an epoch.
UPDATE units SET lease_owner = NULL, lease_expires = NULL;
ALTER TABLE units ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
CREATE INDEX units_by_owner ON units (lease_owner) WHERE lease_owner IS NOT NULL;

-- A batch step one node does alone (validation, finalization) is claimed on the batch row.
ALTER TABLE batches ADD COLUMN claim_owner TEXT;
ALTER TABLE batches ADD COLUMN claim_expires INTEGER;
ALTER TABLE batches ADD COLUMN est_tokens INTEGER NOT NULL DEFAULT 0;
-- When the last batch.progress event was appended (unix ms), to append at most one a second.
ALTER TABLE batches ADD COLUMN last_progress_ms INTEGER NOT NULL DEFAULT 0;

CREATE TABLE nodes (
    id         TEXT PRIMARY KEY,
    started_at INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    info       TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant     TEXT NOT NULL,
    batch_id   TEXT NOT NULL,
    type       TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX events_by_batch ON events (batch_id, id);
CREATE INDEX events_by_tenant ON events (tenant, id);

-- One row per final-status event, queued in the transaction that made the batch final.
CREATE TABLE webhook_deliveries (
    event_id        INTEGER PRIMARY KEY,
    state           TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    claim_owner     TEXT,
    claim_expires   INTEGER
);
CREATE INDEX deliveries_due ON webhook_deliveries (next_attempt_ms) WHERE state = 'pending';

CREATE TABLE webhook_attempts (
    event_id    INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    status      INTEGER,
    error       TEXT,
    duration_ms INTEGER NOT NULL,
    delivered   INTEGER NOT NULL,
    retry_at_ms INTEGER
);
CREATE INDEX attempts_by_event ON webhook_attempts (event_id);

CREATE TABLE batch_usage (
    batch_id         TEXT NOT NULL,
    model            TEXT NOT NULL,
    hour             INTEGER NOT NULL,
    requests         INTEGER NOT NULL DEFAULT 0,
    input_tokens     INTEGER NOT NULL DEFAULT 0,
    cached_tokens    INTEGER NOT NULL DEFAULT 0,
    output_tokens    INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, model, hour)
);
