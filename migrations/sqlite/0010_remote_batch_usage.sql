-- batchd embedded schema (sqlite 0010, as PostgreSQL's 0007): the tokens a remote batch's
-- results reported, recorded when it is collected, for its cost at the batch price
-- (engine::remote, the batch object's `remote_batches`).
ALTER TABLE remote_batches ADD COLUMN input_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE remote_batches ADD COLUMN output_tokens BIGINT NOT NULL DEFAULT 0;
