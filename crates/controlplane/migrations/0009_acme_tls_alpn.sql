-- TLS-ALPN-01 (RFC 8737) beside HTTP-01: a pending challenge's kind. An
-- 'http-01' row is answered at /.well-known/acme-challenge/<token> on the
-- public listener; a 'tls-alpn-01' row by the TLS listener, with a
-- self-signed certificate for the domain carrying the key authorization's
-- SHA-256 (every node loads those into memory through the routing change
-- feed: a TLS handshake cannot wait on the store).
ALTER TABLE acme_challenges ADD COLUMN kind TEXT NOT NULL DEFAULT 'http-01';
