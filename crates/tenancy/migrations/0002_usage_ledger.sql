-- One row per answered request. Integers only: microseconds, millijoules
-- and micro-units of money, so that sums are exact on both databases.
CREATE TABLE usage_ledger (
    request_id TEXT PRIMARY KEY,
    tenant TEXT,
    key_id TEXT,
    model TEXT NOT NULL,
    pool TEXT,
    upstream TEXT,
    accelerator TEXT,
    prompt_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    ttft_us BIGINT,
    duration_us BIGINT NOT NULL,
    energy_millijoules BIGINT NOT NULL,
    energy_source TEXT NOT NULL,
    cost_micros BIGINT NOT NULL,
    status BIGINT NOT NULL,
    finish_reason TEXT,
    started_at BIGINT NOT NULL
);

CREATE INDEX usage_ledger_by_tenant ON usage_ledger (tenant, started_at);
