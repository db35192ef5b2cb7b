-- The outbox table on MySQL 8.0.13+ and MariaDB 10.6+: services INSERT into it inside their
-- own transaction, the relay publishes. Plain SQL: any migration tool can apply it.
-- `outbox migrate` applies it too, replacing the word `outbox` by the table name chosen with
-- OUTBOX_TABLE. Every index is declared in CREATE TABLE (MySQL has no CREATE INDEX IF NOT
-- EXISTS), so applying this file twice changes nothing.

CREATE TABLE IF NOT EXISTS outbox (
    -- Relay-owned: handed out at insert, the order of rows within an ordering key.
    id              BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- Service-written: becomes the AMQP message-id; consumers deduplicate on it.
    message_id      CHAR(36) NOT NULL DEFAULT (UUID()),
    -- Service-written: target exchange ('' = the default exchange).
    exchange        VARCHAR(255) NOT NULL DEFAULT '',
    -- Service-written: routing key.
    routing_key     VARCHAR(255) NOT NULL,
    -- Service-written: rows sharing a key are published in id order; NULL = no order.
    ordering_key    VARCHAR(255) NULL,
    -- Service-written: becomes the AMQP `type` property.
    message_type    VARCHAR(255) NULL,
    -- Service-written: the message body, published as application/json.
    payload         JSON NOT NULL,
    -- Service-written: flat object of string/number/bool values copied into AMQP headers.
    headers         JSON NOT NULL DEFAULT ('{}'),
    -- Relay-owned: when the row was written; the AMQP timestamp and the latency origin.
    created_at      TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    -- Relay-owned: 'pending' (to publish), 'sent' (confirmed, kept for OUTBOX_RETENTION) or 'dead'.
    state           VARCHAR(7) NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'dead')),
    -- Relay-owned: failed publish attempts so far (a lost connection does not count).
    attempts        INT NOT NULL DEFAULT 0,
    -- Relay-owned: the row is not claimed before this time (retry backoff).
    next_attempt_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    -- Relay-owned: why the last attempt failed.
    last_error      TEXT NULL,
    -- Relay-owned: when the broker confirmed the row (only while sent rows are retained).
    sent_at         TIMESTAMP(6) NULL DEFAULT NULL,
    -- Relay-owned, computed: the row holds back the later rows of its key (dead, or waiting
    -- to retry). Indexed, so that the ordering check of a claim reads no other rows.
    blocking        TINYINT AS (state = 'dead' OR (state = 'pending' AND attempts > 0)) VIRTUAL,
    -- Every index costs each insert and each mark: four in all.
    UNIQUE KEY outbox_message_id_key (message_id),
    -- Claims walk pending rows in id order; the gauges count pending and dead rows; the
    -- retention purge walks sent rows in id order (the order they were sent in, nearly).
    KEY outbox_state_idx (state, id),
    -- The claimed keys' pending rows below the leader's floor (rows committed late).
    KEY outbox_key_idx (ordering_key, state, id),
    -- The rows that hold back their key (normally none): "is an earlier row of this key
    -- dead or waiting to retry?", retries that fell due, blocked keys.
    KEY outbox_blocking_idx (blocking, ordering_key, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'Transactional outbox: rows written with business data, published by outbox relay';

-- Leadership terms. Each relay that takes the table's leadership (GET_LOCK) raises the term,
-- and every mark it writes checks it in the same transaction: marks written by a relay that
-- lost the table (its host vanished, then came back) change nothing.
CREATE TABLE IF NOT EXISTS outbox_leader (
    -- Always 1: the table has exactly one row.
    singleton TINYINT NOT NULL DEFAULT 1 PRIMARY KEY CHECK (singleton = 1),
    -- Raised by each new leader.
    term      BIGINT NOT NULL DEFAULT 0,
    -- Who took the leadership last (host and process), for operators.
    holder    VARCHAR(255) NULL,
    -- When.
    since     TIMESTAMP(6) NULL DEFAULT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'Leadership term of the outbox relays: marks of an older term change nothing';

INSERT IGNORE INTO outbox_leader (singleton) VALUES (1);
