-- What the control plane keeps for one project is bounded (#21 row 9): log
-- bytes a minute and in all, a line's length, and usage rows. One row per
-- project that has reported activity or had its limits set.

-- A log row's weight in bytes (message, request id, level and a fixed
-- overhead for the other columns and the indexes), so the per-project total
-- is kept exactly as rows come and go. Older rows: estimated once here.
ALTER TABLE logs ADD COLUMN size_bytes BIGINT NOT NULL DEFAULT 0;
UPDATE logs SET size_bytes = LENGTH(message) + 96;

CREATE TABLE project_limits (
    project_id TEXT PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    -- Set by an admin (PUT /projects/{name}/limits); NULL keeps the default.
    log_bytes_per_minute BIGINT,
    log_bytes_total BIGINT,
    log_line_bytes BIGINT,
    usage_rows BIGINT,
    -- What the project holds now, changed in the transaction that changes
    -- the rows it counts (store, evict, prune).
    log_bytes BIGINT NOT NULL,
    usage_row_count BIGINT NOT NULL,
    -- The current minute of the rate bound.
    window_start_ms BIGINT NOT NULL,
    window_bytes BIGINT NOT NULL,
    -- This minute's "lines dropped" entry in `logs` (updated as more drop).
    window_dropped_log_id BIGINT,
    window_dropped_lines BIGINT NOT NULL,
    window_dropped_bytes BIGINT NOT NULL,
    -- Since the row was made: lines dropped over the rate, lines removed
    -- oldest-first for the total bound, lines cut to the line bound, usage
    -- rows removed oldest-first.
    dropped_lines BIGINT NOT NULL,
    dropped_bytes BIGINT NOT NULL,
    evicted_lines BIGINT NOT NULL,
    evicted_bytes BIGINT NOT NULL,
    truncated_lines BIGINT NOT NULL,
    evicted_usage_rows BIGINT NOT NULL
);
