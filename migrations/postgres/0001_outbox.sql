-- The outbox table: services INSERT into it inside their own transaction, the relay publishes.
-- Plain SQL: any migration tool can apply it. `outbox migrate` applies it too, replacing the
-- word `outbox` by the table name chosen with OUTBOX_TABLE.

CREATE TABLE IF NOT EXISTS outbox (
    -- Relay-owned: handed out at insert, the order of rows within an ordering key.
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Service-written: becomes the AMQP message-id; consumers deduplicate on it.
    message_id      UUID NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    -- Service-written: target exchange ('' = the default exchange).
    exchange        TEXT NOT NULL DEFAULT '',
    -- Service-written: routing key.
    routing_key     TEXT NOT NULL,
    -- Service-written: rows sharing a key are published in id order; NULL = no order.
    ordering_key    TEXT NULL,
    -- Service-written: becomes the AMQP `type` property.
    message_type    TEXT NULL,
    -- Service-written: the message body, published as application/json.
    payload         JSONB NOT NULL,
    -- Service-written: flat object of string/number/bool values copied into AMQP headers.
    headers         JSONB NOT NULL DEFAULT '{}',
    -- Relay-owned: when the row was written; the AMQP timestamp and the latency origin.
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Relay-owned: 'pending' (to publish), 'sent' (confirmed, kept for OUTBOX_RETENTION) or 'dead'.
    state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'dead')),
    -- Relay-owned: failed publish attempts so far (a lost connection does not count).
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- Relay-owned: the row is not claimed before this time (retry backoff).
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Relay-owned: why the last attempt failed.
    last_error      TEXT NULL,
    -- Relay-owned: when the broker confirmed the row (only while sent rows are retained).
    sent_at         TIMESTAMPTZ NULL
);

-- Claiming walks pending rows in id order: this index stays as small as the backlog,
-- however many sent rows the table keeps.
CREATE INDEX IF NOT EXISTS outbox_pending_idx ON outbox (id) WHERE state = 'pending';

-- "Is an earlier row of this key still unsent?": the ordering check of every claim.
CREATE INDEX IF NOT EXISTS outbox_unsent_key_idx ON outbox (ordering_key, id) WHERE state <> 'sent';

-- Dead rows, for `outbox status` and `outbox dead list`.
CREATE INDEX IF NOT EXISTS outbox_dead_idx ON outbox (id) WHERE state = 'dead';

-- Retention purges sent rows oldest first.
CREATE INDEX IF NOT EXISTS outbox_sent_idx ON outbox (sent_at) WHERE state = 'sent';

-- Wakes the relay (LISTEN outbox) when rows are committed; polling remains the fallback.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS outbox_notify_trigger ON outbox;
CREATE TRIGGER outbox_notify_trigger AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

COMMENT ON TABLE outbox IS 'Transactional outbox: rows written with business data, published by `outbox relay`';
COMMENT ON COLUMN outbox.message_id IS 'AMQP message-id; consumers deduplicate on it';
COMMENT ON COLUMN outbox.ordering_key IS 'rows sharing a key are published in id order; NULL = no order';
COMMENT ON COLUMN outbox.state IS 'pending, sent (kept for OUTBOX_RETENTION) or dead';
