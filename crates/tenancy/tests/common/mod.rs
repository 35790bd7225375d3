//! What the tenancy tests share: the databases they run on.
#![allow(dead_code, clippy::unwrap_used)]

use neocloud_tenancy::Store;

/// A fresh SQLite file under `name`, and PostgreSQL when
/// `NEOCLOUD_TEST_DATABASE_URL` names one (`.ci/run` sets it; without it
/// the skip is said out loud).
pub async fn stores(name: &str) -> Vec<(String, Store)> {
    let dir = std::env::temp_dir().join(format!("nc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sqlite = format!("sqlite:{}", dir.join("neocloud.db").display());
    let mut out = vec![("sqlite".to_string(), Store::open(&sqlite).await.unwrap())];
    match std::env::var("NEOCLOUD_TEST_DATABASE_URL") {
        Ok(url) => out.push(("postgres".to_string(), Store::open(&url).await.unwrap())),
        Err(_) => eprintln!(
            "SKIPPED on PostgreSQL: NEOCLOUD_TEST_DATABASE_URL is not set (.ci/run sets it)"
        ),
    }
    out
}
