-- Routing changes as deltas (#20): each change that moves routing bumps
-- meta.routing_generation and records here what it touched, under that
-- generation. A node applies the changes past the generation it has
-- loaded, reloading only those subjects; one that falls behind the rows
-- kept (pruned after an hour) reloads whole. The bump's row lock on
-- `meta` orders the generations as the transactions commit.
CREATE TABLE routing_changes (
    generation BIGINT NOT NULL,
    -- 'project' (created, renamed, deleted, promoted), 'deployment' (ready,
    -- or gone), 'domain' (attached, verified, deleted, its certificate).
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    changed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (generation, kind, subject)
);
CREATE INDEX routing_changes_by_time ON routing_changes (changed_at_ms);

-- A project's domains are looked up when it is deleted (each one is a
-- routing change of its own).
CREATE INDEX domains_by_project ON domains (project_id);
