-- Tenants and their API keys. Portable between SQLite and PostgreSQL:
-- times are Unix seconds, flags and limits integers, names text.
CREATE TABLE tenants (
    name TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    disabled BIGINT NOT NULL DEFAULT 0,
    rpm BIGINT,
    tpm BIGINT,
    max_concurrent BIGINT,
    monthly_budget_micros BIGINT
);

CREATE TABLE api_keys (
    public_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants (name),
    secret_sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    models TEXT,
    rpm BIGINT,
    tpm BIGINT
);

CREATE INDEX api_keys_by_tenant ON api_keys (tenant);
