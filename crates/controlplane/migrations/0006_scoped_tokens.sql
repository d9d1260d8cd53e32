-- Scoped, expiring, revocable API tokens and the audit log (#16 item 5).
--
-- A token's scope: 'admin' (every route), or 'deploy' / 'read' on one
-- project, named by its id (a rename keeps the grant; a new project under an
-- old name does not inherit it). The token made when a data dir is first
-- initialised stays 'admin' (the default below). Expiry and revocation are
-- checked on every request from this table (no cache), so a revocation on
-- one node holds on every node sharing the store at its next request.
ALTER TABLE tokens ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE tokens ADD COLUMN project_id TEXT;
ALTER TABLE tokens ADD COLUMN expires_at_ms BIGINT;
ALTER TABLE tokens ADD COLUMN revoked_at_ms BIGINT;
-- Written at most once a minute per token (not one write per request).
ALTER TABLE tokens ADD COLUMN last_used_at_ms BIGINT;

-- Every mutation through the API: who (token id and its name then), what
-- (an action name from the access table, and its target), when, and how it
-- ended (the HTTP status; refusals included). `id` sorts by time: the
-- zero-padded epoch milliseconds then a random suffix, so a page is a range
-- of the primary key, newest first, and pruning is one range delete.
CREATE TABLE audit_log (
    id TEXT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    token_id TEXT NOT NULL,
    token_name TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    -- The project the call was about, when it was about one (no foreign
    -- key: the entry outlives the project).
    project_id TEXT,
    status BIGINT NOT NULL,
    -- 'ok' (2xx), 'denied' (401/403) or 'failed' (anything else)
    outcome TEXT NOT NULL
);
CREATE INDEX audit_log_by_project ON audit_log (project_id, id);
