-- batchd embedded schema, version 4: the hash of a create request beside its idempotency key,
-- so that the key reused with another request is refused instead of answered with the first.
ALTER TABLE batches ADD COLUMN idempotency_hash TEXT;
