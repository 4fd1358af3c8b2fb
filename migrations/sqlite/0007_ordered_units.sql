-- batchd embedded schema, version 7 (as PostgreSQL's 4): work units of a batch dispatched in
-- prefix order list their lines in the batch's order file (engine::order).
ALTER TABLE units ADD COLUMN ordered BOOLEAN NOT NULL DEFAULT FALSE;
