-- The relay now keeps a key's unsent rows in order in its own memory, so a claim only has to
-- hold back rows behind a row that failed: a dead row, or a pending row waiting to retry.
-- This index holds just those rows (normally none), where the one it replaces held every
-- unsent row.
CREATE INDEX IF NOT EXISTS outbox_blocking_key_idx ON outbox (ordering_key, id)
    WHERE state = 'dead' OR (state = 'pending' AND attempts > 0);

DROP INDEX IF EXISTS outbox_unsent_key_idx;

-- The notification now carries the smallest id the statement inserted, so a row committed
-- after higher ids were claimed (ids are handed out at insert, not at commit) is found at
-- once, without scanning the rows already in flight.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', (SELECT min(id)::text FROM outbox_inserted));
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS outbox_notify_trigger ON outbox;
CREATE TRIGGER outbox_notify_trigger AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS outbox_inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
