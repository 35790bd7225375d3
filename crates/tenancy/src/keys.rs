//! API keys: `nc-<public id>-<secret>`. The public id finds the key; only a
//! SHA-256 of the secret is stored, and a presented secret is compared with
//! it in constant time. The whole key is shown once, when it is made.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Hex digits of a public id (8 random bytes).
const PUBLIC_ID_HEX: usize = 16;
/// Hex digits of a secret (32 random bytes).
const SECRET_HEX: usize = 64;

/// A key as it is made: shown to its owner once, then only its hash is kept.
pub struct IssuedKey {
    /// Finds the key; safe to show and log.
    pub public_id: String,
    secret: String,
}

impl IssuedKey {
    /// A new key from the operating system's randomness.
    pub fn generate() -> Self {
        IssuedKey {
            public_id: random_hex(PUBLIC_ID_HEX / 2),
            secret: random_hex(SECRET_HEX / 2),
        }
    }

    /// The key as clients send it: `nc-<public id>-<secret>`.
    pub fn reveal(&self) -> String {
        format!("nc-{}-{}", self.public_id, self.secret)
    }

    /// The stored form of the secret.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IssuedKey(nc-{}-…)", self.public_id)
    }
}

/// A key as a client presented it, split into its parts; its secret is
/// never printed.
pub struct PresentedKey {
    /// The public id it names.
    pub public_id: String,
    secret: String,
}

impl PresentedKey {
    /// Splits `nc-<public id>-<secret>`; `None` when the text has not that
    /// shape (no lookup is made for it).
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("nc-")?;
        let (public_id, secret) = rest.split_once('-')?;
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        (hex(public_id, PUBLIC_ID_HEX) && hex(secret, SECRET_HEX)).then(|| PresentedKey {
            public_id: public_id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// Whether the secret hashes to `stored` (compared in constant time).
    pub fn matches(&self, stored: &str) -> bool {
        hash_secret(&self.secret)
            .as_bytes()
            .ct_eq(stored.as_bytes())
            .into()
    }
}

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PresentedKey(nc-{}-…)", self.public_id)
    }
}

fn hash_secret(secret: &str) -> String {
    to_hex(&Sha256::digest(secret.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    to_hex(&buf)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_key_parses_back_and_matches_only_its_hash() {
        let key = IssuedKey::generate();
        let text = key.reveal();
        assert!(text.starts_with("nc-") && text.len() == 3 + 16 + 1 + 64);
        let presented = PresentedKey::parse(&text).unwrap();
        assert_eq!(presented.public_id, key.public_id);
        assert!(presented.matches(&key.secret_hash()));
        assert!(!presented.matches(&IssuedKey::generate().secret_hash()));
        // The secret shows in neither Debug form.
        let secret = &text[text.len() - 64..];
        assert!(!format!("{key:?}{presented:?}").contains(secret));
        assert_ne!(key.public_id, IssuedKey::generate().public_id);
    }

    #[test]
    fn malformed_keys_are_refused_before_any_lookup() {
        let good = IssuedKey::generate().reveal();
        for bad in [
            String::new(),
            "sk-abc".to_string(),
            good.replace("nc-", "nc_"),
            good[..good.len() - 1].to_string(),
            format!("{good}0"),
            good.to_uppercase(),
            good.replacen('-', "", 2),
        ] {
            assert!(PresentedKey::parse(&bad).is_none(), "{bad}");
        }
    }
}
