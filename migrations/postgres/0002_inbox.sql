-- The consumer inbox: one row per (consumer, message id) applied, written in the same
-- transaction as the handler's effects, so a message redelivered or published twice is
-- applied once. Rows are deleted after the deduplication window (7 days by default).

CREATE TABLE IF NOT EXISTS outbox_inbox (
    -- The consumer's name: several consumers of one database keep separate records.
    consumer    TEXT NOT NULL,
    -- The AMQP message-id of the applied message (any string, not only UUIDs).
    message_id  TEXT NOT NULL,
    -- When it was applied; rows older than the deduplication window are purged.
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- The purge deletes the oldest rows first, a bounded batch at a time.
CREATE INDEX IF NOT EXISTS outbox_inbox_received_idx ON outbox_inbox (received_at);

COMMENT ON TABLE outbox_inbox IS 'Consumer inbox: message ids applied, for exactly-once effects';
