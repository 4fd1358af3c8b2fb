-- batchd embedded schema, version 2: a result's key packs its batch and its line.
-- `key` = batches.seq << 32 | line is the rowid itself, so a result costs one table entry and
-- one index entry (by custom_id, within its batch) instead of a table entry and two indexes,
-- and a batch's results are one contiguous rowid range, in line order.
CREATE TABLE results_v2 (
    key       INTEGER PRIMARY KEY,
    custom_id TEXT NOT NULL,
    ok        INTEGER NOT NULL,
    record    TEXT NOT NULL
);
INSERT INTO results_v2 (key, custom_id, ok, record)
    SELECT (b.seq << 32) | r.line, r.custom_id, r.ok, r.record
    FROM results r JOIN batches b ON b.id = r.batch_id
    ORDER BY r.id;
DROP TABLE results;
ALTER TABLE results_v2 RENAME TO results;
CREATE INDEX results_by_custom_id ON results (key >> 32, custom_id);
