-- Leadership terms. Each relay that takes the table's leadership raises the term, and every
-- mark it writes checks it in the same statement: marks written by a relay that lost the
-- table (its host vanished, then came back) change nothing.
CREATE TABLE IF NOT EXISTS outbox_leader (
    -- Always true: the table has exactly one row.
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    -- Raised by each new leader.
    term      BIGINT NOT NULL DEFAULT 0,
    -- Who took the leadership last (host and process), for operators.
    holder    TEXT NULL,
    -- When.
    since     TIMESTAMPTZ NULL
);

INSERT INTO outbox_leader (singleton) VALUES (TRUE) ON CONFLICT DO NOTHING;

COMMENT ON TABLE outbox_leader IS 'Leadership term of the outbox relays: marks of an older term change nothing';

-- Each claimed row carries the id of the pending row just before it on its key, from this
-- index: the leader publishes a row only after that one, even when the earlier row was
-- committed late and its notification never came.
CREATE INDEX IF NOT EXISTS outbox_pending_key_idx ON outbox (ordering_key, id)
    WHERE state = 'pending' AND ordering_key IS NOT NULL;
