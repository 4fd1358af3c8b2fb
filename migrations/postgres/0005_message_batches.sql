-- Anthropic's Message Batches (as the embedded schema v8). api: the API a batch was created
-- through ('openai' or 'anthropic'), which says how its objects and results are rendered;
-- deleted_at: when its API deleted it (the row stays, hidden from its tenant, so list cursors
-- naming it still place a page); unrun: the lines a cancel or an expiry ended before they ran
-- (recorded by the finalizer before it fills them in).
ALTER TABLE batches ADD COLUMN api TEXT NOT NULL DEFAULT 'openai';
ALTER TABLE batches ADD COLUMN deleted_at BIGINT;
ALTER TABLE batches ADD COLUMN unrun BIGINT;
