-- Latency and status classes per usage interval (issue 16 item 3), from the
-- runner's isocloud extensions of the `usage` event: requests by time to the
-- response head, one column per bucket of the fixed bounds (5 ms … 10 s, then
-- +Inf: latency_le_inf), and by the class of their status. Rows of a runner
-- that sends neither (or sends them malformed) keep zeros.

ALTER TABLE usage_records ADD COLUMN latency_le_5 BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN latency_le_10 BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN latency_le_25 BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN latency_le_50 BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN latency_le_100 BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN latency_le_250 BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN latency_le_500 BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN latency_le_1000 BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN latency_le_2500 BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN latency_le_5000 BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN latency_le_10000 BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN latency_le_inf BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN status_1xx BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN status_2xx BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN status_3xx BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN status_4xx BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN status_5xx BIGINT NOT NULL DEFAULT 0;
