//! The store on a real SQLite file, and on a real PostgreSQL when
//! `NEOCLOUD_TEST_DATABASE_URL` names one (`.ci/run` starts one): tenants,
//! keys, and who a presented key speaks for.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::stores;
use neocloud_tenancy::store::now_secs;
use neocloud_tenancy::{KeyGrant, Limits, Refusal, TenancyError};

/// A tenant name unique to this run (PostgreSQL keeps what earlier runs
/// wrote).
fn unique(base: &str) -> String {
    format!("{base}-{}-{}", std::process::id(), now_secs())
}

#[tokio::test]
async fn tenants_and_keys_round_trip_and_keys_say_who_they_are() {
    for (db, store) in stores("tenancy-round-trip").await {
        let acme = unique("acme");
        let limits = Limits {
            rpm: Some(60),
            tpm: Some(10_000),
            max_concurrent: Some(4),
            monthly_budget_micros: Some(5_000_000),
        };
        store.create_tenant(&acme, limits).await.unwrap();
        assert!(matches!(
            store.create_tenant(&acme, Limits::default()).await,
            Err(TenancyError::Exists(_))
        ));
        assert!(store.tenant_count().await.unwrap() >= 1);
        let grant = KeyGrant {
            expires_in_secs: Some(3600),
            models: Some(vec!["gemma-3-270m".into()]),
            rpm: Some(10),
            tpm: None,
        };
        let (issued, record) = store.create_key(&acme, &grant).await.unwrap();
        let token = issued.reveal();
        let who = store
            .authenticate(&token, now_secs())
            .await
            .unwrap()
            .unwrap_or_else(|r| panic!("{db}: refused {r:?}"));
        assert_eq!(who.tenant, acme, "{db}");
        assert_eq!(who.key_id, record.public_id);
        assert_eq!(who.tenant_limits, limits);
        assert_eq!(who.key_limits.rpm, Some(10));
        assert!(who.may_use("gemma-3-270m") && !who.may_use("other"));
        // The stored row holds no secret.
        let keys = store.keys(Some(&acme)).await.unwrap();
        assert_eq!(keys, vec![record.clone()]);
        assert!(!format!("{keys:?}").contains(&token[token.len() - 64..]));

        // A wrong secret for a real id, a malformed token, expiry.
        let wrong = format!("{}{}", &token[..token.len() - 64], "0".repeat(64));
        let refusal = |t: &str, now| {
            let store = store.clone();
            let t = t.to_owned();
            async move { store.authenticate(&t, now).await.unwrap().unwrap_err() }
        };
        assert_eq!(refusal(&wrong, now_secs()).await, Refusal::Unknown, "{db}");
        assert_eq!(refusal("sk-nope", now_secs()).await, Refusal::Malformed);
        assert_eq!(refusal(&token, now_secs() + 7200).await, Refusal::Expired);

        // Disabling the tenant, then revoking the key.
        store.set_tenant_disabled(&acme, true).await.unwrap();
        assert_eq!(refusal(&token, now_secs()).await, Refusal::TenantDisabled);
        assert!(store.create_key(&acme, &KeyGrant::default()).await.is_err());
        store.set_tenant_disabled(&acme, false).await.unwrap();
        store.revoke_key(&record.public_id).await.unwrap();
        assert_eq!(refusal(&token, now_secs()).await, Refusal::Revoked);
        assert!(store.revoke_key(&record.public_id).await.is_err());

        // Limits change; bad names and unknown tenants are errors.
        store
            .update_tenant(
                &acme,
                Limits {
                    rpm: Some(1),
                    ..Limits::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            store.tenant(&acme).await.unwrap().unwrap().limits.rpm,
            Some(1)
        );
        assert!(store
            .create_tenant("Bad Name", Limits::default())
            .await
            .is_err());
        assert!(store
            .create_key("nobody-here", &KeyGrant::default())
            .await
            .is_err());
        store.close().await;
    }
}

#[test]
fn durations_read_as_operators_write_them() {
    use neocloud_tenancy::parse_duration_secs;
    assert_eq!(parse_duration_secs("30d").unwrap(), 30 * 86_400);
    assert_eq!(parse_duration_secs("12h").unwrap(), 12 * 3_600);
    assert_eq!(parse_duration_secs("90m").unwrap(), 5_400);
    for bad in ["", "d", "30", "-1d", "0d", "1w", "99999999999999999999d"] {
        assert!(parse_duration_secs(bad).is_err(), "{bad}");
    }
}
