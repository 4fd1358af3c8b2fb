-- Work units of a batch dispatched in prefix order list their lines in the batch's order
-- file (engine::order).
ALTER TABLE units ADD COLUMN ordered BOOLEAN NOT NULL DEFAULT FALSE;
