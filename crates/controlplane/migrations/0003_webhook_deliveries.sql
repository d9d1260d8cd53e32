-- Git webhook deliveries a project acted on, so the same delivery sent again
-- (a replay, or the forge's redelivery) is answered `ignored` and builds
-- nothing. Each delivery is kept under two keys: `body:<SHA-256 of the
-- signed body>` (what an attacker cannot change) and `id:<the forge's
-- delivery id>` (X-GitHub-Delivery). Bounded: rows older than 7 days, and
-- past the newest 1,000 of a project, are pruned when one is added.
CREATE TABLE webhook_deliveries (
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    delivery_key TEXT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    -- The deployment the delivery made.
    deployment_id TEXT NOT NULL,
    PRIMARY KEY (project_id, delivery_key)
);
CREATE INDEX webhook_deliveries_by_time ON webhook_deliveries (project_id, received_at_ms);
