-- batchd embedded schema, version 8 (as PostgreSQL's 5): Anthropic's Message Batches.
-- api: the API a batch was created through ('openai' or 'anthropic'), which says how its
-- objects and results are rendered; deleted_at: when its API deleted it (Anthropic's delete;
-- the row stays, hidden from its tenant, so list cursors naming it still place a page);
-- unrun: the lines a cancel or an expiry ended before they ran (recorded by the finalizer
-- before it fills them in, so request_counts can tell them from errors).
ALTER TABLE batches ADD COLUMN api TEXT NOT NULL DEFAULT 'openai';
ALTER TABLE batches ADD COLUMN deleted_at INTEGER;
ALTER TABLE batches ADD COLUMN unrun INTEGER;
