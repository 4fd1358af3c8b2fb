-- batchd embedded schema, version 6 (as PostgreSQL's 3): list cursors that survive a delete,
-- and an id for each webhook attempt, as PostgreSQL has.

-- A deleted file's id, tenant and place in the list (`seq`), kept for a while so that a list
-- cursor naming it still places the next page.
CREATE TABLE tombstones (
    id         TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    deleted_ms INTEGER NOT NULL
);
CREATE INDEX tombstones_by_age ON tombstones (deleted_ms);

-- Attempts in the order they were made, by an id of their own (it was the rowid).
CREATE TABLE webhook_attempts_v6 (
    id          INTEGER PRIMARY KEY,
    event_id    INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    status      INTEGER,
    error       TEXT,
    duration_ms INTEGER NOT NULL,
    delivered   INTEGER NOT NULL,
    retry_at_ms INTEGER
);
INSERT INTO webhook_attempts_v6 (id, event_id, at, status, error, duration_ms, delivered, retry_at_ms)
    SELECT rowid, event_id, at, status, error, duration_ms, delivered, retry_at_ms FROM webhook_attempts ORDER BY rowid;
DROP TABLE webhook_attempts;
ALTER TABLE webhook_attempts_v6 RENAME TO webhook_attempts;
CREATE INDEX attempts_by_event ON webhook_attempts (event_id);
