//! The ledger on a real SQLite file, and on PostgreSQL when
//! `NEOCLOUD_TEST_DATABASE_URL` names one: rows written in batches off the
//! caller's path, each request once however often it is written, all of
//! them committed once `flush` returns.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::stores;
use neocloud_tenancy::ledger::{LedgerRow, LedgerWriter, BATCH_ROWS};

fn row(tenant: &str, i: usize) -> LedgerRow {
    LedgerRow {
        request_id: format!("{tenant}-{i:06}"),
        tenant: Some(tenant.to_owned()),
        key_id: Some("0123456789abcdef".into()),
        model: "gemma-3-270m".into(),
        pool: Some("gemma-3-270m".into()),
        upstream: Some("gemma-3-270m/0".into()),
        accelerator: Some("cpu".into()),
        prompt_tokens: 10 + i as u64,
        cached_tokens: 0,
        completion_tokens: 5,
        ttft_us: Some(1_500),
        duration_us: 90_000,
        energy_millijoules: 2_250,
        energy_source: "estimated".into(),
        cost_micros: 7,
        status: 200,
        finish_reason: Some("length".into()),
        started_at: 1_796_300_000 + i as u64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_lands_once_and_flush_waits_for_them() {
    for (db, store) in stores("ledger").await {
        let tenant = format!("ledger-{}-{}", std::process::id(), db);
        let writer = LedgerWriter::start(store.clone());
        // More than one batch, with every row written twice (a replay
        // after a crash, say), the second time with its final counts.
        let n = BATCH_ROWS + 37;
        for i in 0..n {
            let mut first = row(&tenant, i);
            first.completion_tokens = 0;
            writer.record(first);
        }
        for i in 0..n {
            writer.record(row(&tenant, i));
        }
        writer.flush().await;
        let rows = store.ledger_rows(Some(&tenant)).await.unwrap();
        assert_eq!(rows.len(), n, "{db}");
        assert_eq!(rows[0], row(&tenant, 0), "{db}");
        assert!(rows.iter().all(|r| r.completion_tokens == 5), "{db}");
        assert_eq!(
            rows.iter().map(|r| r.prompt_tokens).sum::<u64>(),
            (0..n as u64).map(|i| 10 + i).sum::<u64>()
        );
        store.close().await;
    }
}
