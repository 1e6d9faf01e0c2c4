-- flowgate's transactional inbox and outbox (see src/postgres/mod.rs).

-- One row per message id a stage has committed: a redelivery finds it and
-- is acked without calling the handler. The primary key is the lookup
-- (a B-tree: O(log n)); processed_at's index serves the retention sweep.
CREATE TABLE flowgate_inbox (
    stage        text        NOT NULL,
    message_id   text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stage, message_id)
);
CREATE INDEX flowgate_inbox_processed_at ON flowgate_inbox (processed_at);

-- Messages committed with the data that caused them, waiting to be
-- published by a relay. `record` is the message in flowgate's versioned
-- record format (the spool's: exchange, routing key, body, properties);
-- message_id, exchange and routing_key are copies for people and queries.
CREATE TABLE flowgate_outbox (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  text        NOT NULL,
    exchange    text        NOT NULL,
    routing_key text        NOT NULL,
    record      bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Set by a relay for a row that can never be published (the broker
    -- returned it as unroutable, or it cannot be decoded): kept for people,
    -- skipped by the relays.
    dead_reason text,
    dead_at     timestamptz
);
-- The relays' scan: live rows in id order.
CREATE INDEX flowgate_outbox_live ON flowgate_outbox (id) WHERE dead_reason IS NULL;

-- Wakes the relays (LISTEN flowgate_outbox) when an insert commits.
CREATE FUNCTION flowgate_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flowgate_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER flowgate_outbox_notify AFTER INSERT ON flowgate_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION flowgate_outbox_notify();
