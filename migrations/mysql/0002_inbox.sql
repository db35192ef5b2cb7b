-- The consumer inbox: one row per (consumer, message id) applied, written in the same
-- transaction as the handler's effects, so a message redelivered or published twice is
-- applied once. Rows are deleted after the deduplication window (7 days by default).

CREATE TABLE IF NOT EXISTS outbox_inbox (
    -- The consumer's name: several consumers of one database keep separate records.
    consumer    VARCHAR(255) NOT NULL,
    -- The AMQP message-id of the applied message (any string of up to 255 bytes).
    message_id  VARCHAR(255) NOT NULL,
    -- When it was applied; rows older than the deduplication window are purged.
    received_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (consumer, message_id),
    -- The purge deletes the oldest rows first, a bounded batch at a time.
    KEY outbox_inbox_received_idx (received_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'Consumer inbox: message ids applied, for exactly-once effects';
