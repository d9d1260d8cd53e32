-- Automatic certificates (ACME, RFC 8555) for verified custom domains.

-- Where a certificate came from: 'manual' (uploaded through the API) or
-- 'acme' (ordered by the control plane). A manual one always wins: an ACME
-- write never replaces it, an upload replaces an ACME one.
ALTER TABLE certificates ADD COLUMN source TEXT NOT NULL DEFAULT 'manual';

-- The ACME account of each directory, created once and shared by every
-- node: its key (PKCS#8, in instant-acme's credentials JSON) is a secret
-- like the certificates' keys.
CREATE TABLE acme_accounts (
    directory_url TEXT PRIMARY KEY,
    credentials_json TEXT NOT NULL,
    email TEXT,
    created_at_ms BIGINT NOT NULL
);

-- Each domain's ordering state: the last outcome (status 'valid' or
-- 'failed', with the ACME server's error), when to try next (renewal, or
-- the retry after a failure, backing off), and the lease a node holds while
-- it works on the order (several nodes share one store; one orders).
CREATE TABLE acme_orders (
    domain TEXT PRIMARY KEY REFERENCES domains (domain) ON DELETE CASCADE,
    status TEXT NOT NULL,
    error TEXT,
    failures BIGINT NOT NULL,
    next_attempt_at_ms BIGINT NOT NULL,
    last_attempt_at_ms BIGINT,
    lease_owner TEXT,
    lease_until_ms BIGINT,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX acme_orders_by_next_attempt ON acme_orders (next_attempt_at_ms);

-- HTTP-01 key authorizations while a challenge is pending, so whichever
-- node's public listener the ACME server reaches answers it.
CREATE TABLE acme_challenges (
    domain TEXT NOT NULL REFERENCES domains (domain) ON DELETE CASCADE,
    token TEXT NOT NULL,
    key_authorization TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (domain, token)
);
