-- batchd embedded schema, version 10 (as PostgreSQL's 7): remote batches at batch-kind
-- upstreams (engine::remote), each recorded before its side effects; `key` is both the
-- idempotency key and the metadata tag a restart finds an unrecorded remote batch by.
CREATE TABLE remote_batches (
    key TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    unit_idx BIGINT NOT NULL,
    upstream TEXT NOT NULL,
    model TEXT NOT NULL,
    lines TEXT NOT NULL,
    line_count BIGINT NOT NULL,
    est_tokens BIGINT NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    input_file_id TEXT,
    remote_id TEXT,
    remote_status TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX remote_batches_batch ON remote_batches (batch_id, unit_idx);
