-- batchd PostgreSQL schema, version 3 (as the embedded schema v6): list cursors that survive
-- a delete. A deleted file's id, tenant and place in the list (`seq`), kept for a while so
-- that a list cursor naming it still places the next page.
CREATE TABLE tombstones (
    id         TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    deleted_ms BIGINT NOT NULL
);
CREATE INDEX tombstones_by_age ON tombstones (deleted_ms);
