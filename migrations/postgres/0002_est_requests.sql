-- batchd PostgreSQL schema, version 2 (as the embedded schema v5): the lines of a batch's
-- input counted at its create, so that a batch still validating holds its lines against the
-- tenant's max_queued_requests.
ALTER TABLE batches ADD COLUMN est_requests BIGINT NOT NULL DEFAULT 0;
