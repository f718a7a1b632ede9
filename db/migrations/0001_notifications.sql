-- Outbox of customer notifications. Workflows write one row per (order, kind) through an
-- activity; a mailer or bot drains rows whose sent_at is null. The unique key makes the
-- activity safe to retry.
CREATE TABLE IF NOT EXISTS notifications (
    id          bigserial PRIMARY KEY,
    order_id    text        NOT NULL,
    kind        text        NOT NULL,
    channel     text        NOT NULL,
    recipient   text,
    payload     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,
    UNIQUE (order_id, kind)
);

CREATE INDEX IF NOT EXISTS notifications_unsent_idx
    ON notifications (created_at) WHERE sent_at IS NULL;
