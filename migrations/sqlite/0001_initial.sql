-- batchd embedded schema, version 1.
CREATE TABLE files (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    tenant     TEXT NOT NULL,
    bytes      INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    expires_at INTEGER,
    blob_key   TEXT NOT NULL
);
CREATE INDEX files_by_tenant ON files (tenant, seq);
CREATE INDEX files_by_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE batches (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    id                   TEXT NOT NULL UNIQUE,
    tenant               TEXT NOT NULL,
    idempotency_key      TEXT,
    endpoint             TEXT NOT NULL,
    input_file_id        TEXT NOT NULL,
    completion_window    TEXT NOT NULL,
    metadata             TEXT,
    model                TEXT,
    status               TEXT NOT NULL,
    output_file_id       TEXT,
    error_file_id        TEXT,
    errors               TEXT,
    created_at           INTEGER NOT NULL,
    in_progress_at       INTEGER,
    expires_at           INTEGER,
    finalizing_at        INTEGER,
    completed_at         INTEGER,
    failed_at            INTEGER,
    expired_at           INTEGER,
    cancelling_at        INTEGER,
    cancelled_at         INTEGER,
    total                INTEGER NOT NULL DEFAULT 0,
    completed            INTEGER NOT NULL DEFAULT 0,
    failed               INTEGER NOT NULL DEFAULT 0,
    input_tokens         INTEGER NOT NULL DEFAULT 0,
    cached_tokens        INTEGER NOT NULL DEFAULT 0,
    output_tokens        INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens     INTEGER NOT NULL DEFAULT 0,
    total_tokens         INTEGER NOT NULL DEFAULT 0,
    priority             INTEGER NOT NULL DEFAULT 1,
    input_format         TEXT,
    output_expires_after INTEGER,
    finalize_as          TEXT
);
CREATE INDEX batches_by_tenant ON batches (tenant, seq);
CREATE INDEX batches_by_status ON batches (status);
CREATE INDEX batches_by_input ON batches (input_file_id);
CREATE UNIQUE INDEX batches_by_idempotency_key ON batches (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE units (
    batch_id      TEXT NOT NULL,
    idx           INTEGER NOT NULL,
    first_line    INTEGER NOT NULL,
    end_line      INTEGER NOT NULL,
    line_count    INTEGER NOT NULL,
    byte_offset   INTEGER NOT NULL,
    byte_len      INTEGER NOT NULL,
    done          INTEGER NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    lease_expires INTEGER,
    PRIMARY KEY (batch_id, idx)
);

-- A rowid table: records are large (a whole output line), which WITHOUT ROWID handles badly.
CREATE TABLE results (
    id        INTEGER PRIMARY KEY,
    batch_id  TEXT NOT NULL,
    line      INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    ok        INTEGER NOT NULL,
    record    TEXT NOT NULL,
    UNIQUE (batch_id, line)
);
CREATE INDEX results_by_custom_id ON results (batch_id, custom_id);
