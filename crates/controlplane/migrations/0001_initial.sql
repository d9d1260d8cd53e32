-- The control plane's schema. One migration set for SQLite and PostgreSQL:
-- TEXT and BIGINT only (times are epoch milliseconds, flags 0/1), ids made
-- by the application (no AUTOINCREMENT/SERIAL), no blob bytes (those live in
-- the blob store, named here by SHA-256).

-- One row: counters that several control-plane nodes share.
CREATE TABLE meta (
    id BIGINT PRIMARY KEY,
    -- Bumped by every change to what routes where (or which certificate a
    -- host gets); nodes reload their tables when it moves.
    routing_generation BIGINT NOT NULL,
    -- The next log id. Taken with UPDATE … RETURNING, whose row lock holds
    -- until commit, so ids become visible in order (log follow relies on it).
    next_log_id BIGINT NOT NULL
);
INSERT INTO meta (id, routing_generation, next_log_id) VALUES (1, 1, 1);

CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    -- No foreign key: deployments reference projects; the application keeps
    -- this pointing at one of the project's ready deployments.
    production_deployment_id TEXT,
    git_repository TEXT,
    git_branch TEXT,
    git_entrypoint TEXT,
    git_secret TEXT
);

CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    created_at_ms BIGINT NOT NULL,
    -- building | ready | failed
    status TEXT NOT NULL,
    error TEXT,
    -- The module specifier loading starts at (file:///src/main.ts).
    entrypoint TEXT NOT NULL,
    eszip_sha256 TEXT,
    permissions_json TEXT NOT NULL,
    -- The project's env vars as they were when the deployment was created.
    envs_json TEXT NOT NULL,
    git_commit TEXT,
    git_message TEXT,
    git_branch TEXT,
    file_count BIGINT NOT NULL,
    size_bytes BIGINT NOT NULL,
    -- Git builds: promote when the build succeeds (1) or not (0); and when a
    -- node claimed the build (a stale claim is taken over).
    build_promote BIGINT NOT NULL,
    build_claimed_at_ms BIGINT
);
CREATE INDEX deployments_by_project ON deployments (project_id, created_at_ms);
CREATE INDEX deployments_by_status ON deployments (status);

CREATE TABLE deployment_files (
    deployment_id TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    PRIMARY KEY (deployment_id, path)
);
CREATE INDEX deployment_files_by_hash ON deployment_files (deployment_id, sha256);

-- Production history per project, oldest first by seq; rollback pops it.
CREATE TABLE promotions (
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    deployment_id TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    promoted_at_ms BIGINT NOT NULL,
    PRIMARY KEY (project_id, seq)
);

CREATE TABLE env_vars (
    project_id TEXT NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (project_id, name)
);

CREATE TABLE domains (
    domain TEXT PRIMARY KEY,
    project_id TEXT REFERENCES projects (id) ON DELETE SET NULL,
    created_at_ms BIGINT NOT NULL,
    token TEXT NOT NULL,
    verified_at_ms BIGINT
);

CREATE TABLE certificates (
    domain TEXT PRIMARY KEY REFERENCES domains (domain) ON DELETE CASCADE,
    cert_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    names_json TEXT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE TABLE logs (
    id BIGINT PRIMARY KEY,
    project_id TEXT NOT NULL,
    deployment_id TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    timestamp_ms BIGINT NOT NULL,
    -- log | boot | boot_failure | uncaught_exception | cpu_time_limit | memory_limit | terminated
    kind TEXT NOT NULL,
    level TEXT,
    message TEXT NOT NULL,
    request_id TEXT
);
CREATE INDEX logs_by_project ON logs (project_id, id);
CREATE INDEX logs_by_deployment ON logs (deployment_id, id);
CREATE INDEX logs_by_time ON logs (timestamp_ms);

CREATE TABLE usage_records (
    id BIGINT PRIMARY KEY,
    project_id TEXT NOT NULL,
    deployment_id TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    interval_start_ms BIGINT NOT NULL,
    interval_end_ms BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    cpu_ms BIGINT NOT NULL,
    wall_ms BIGINT NOT NULL,
    ingress_bytes BIGINT NOT NULL,
    egress_bytes BIGINT NOT NULL,
    peak_memory_bytes BIGINT NOT NULL,
    -- The isolate's own outbound calls (through the runner's egress proxy).
    fetch_requests BIGINT NOT NULL,
    fetch_sent_bytes BIGINT NOT NULL,
    fetch_received_bytes BIGINT NOT NULL
);
CREATE INDEX usage_by_project ON usage_records (project_id, interval_start_ms);
CREATE INDEX usage_by_deployment ON usage_records (deployment_id, interval_start_ms);
CREATE INDEX usage_by_end ON usage_records (interval_end_ms);

-- Activity batches already stored, so a redelivered batch is stored once.
CREATE TABLE activity_batches (
    batch_id TEXT PRIMARY KEY,
    received_at_ms BIGINT NOT NULL
);
CREATE INDEX activity_batches_by_time ON activity_batches (received_at_ms);
