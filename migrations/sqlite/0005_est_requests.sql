-- batchd embedded schema, version 5: the lines of a batch's input counted at its create, so
-- that a batch still validating holds its lines against the tenant's max_queued_requests.
ALTER TABLE batches ADD COLUMN est_requests INTEGER NOT NULL DEFAULT 0;
