//! Device authentication.
//!
//! The default scheme needs no per-device state on the gateway: a device's token is the
//! lowercase hex HMAC-SHA256 of its id under a fleet secret, so provisioning a device means
//! computing one string, and any gateway replica can check any device.

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::common::Secret;

type HmacSha256 = hmac::Hmac<Sha256>;

/// How devices are authenticated.
#[derive(Clone)]
pub enum DeviceAuth {
    /// Token = hex(HMAC-SHA256(secret, device_id)).
    Hmac(Secret),
    /// No authentication: only when explicitly asked for (`--insecure-no-auth`).
    Insecure,
}

impl std::fmt::Debug for DeviceAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceAuth::Hmac(_) => f.write_str("Hmac(***)"),
            DeviceAuth::Insecure => f.write_str("Insecure"),
        }
    }
}

impl DeviceAuth {
    /// Checks `token` for `device_id` in constant time.
    pub fn verify(&self, device_id: &str, token: &str) -> bool {
        match self {
            DeviceAuth::Insecure => true,
            DeviceAuth::Hmac(secret) => {
                let Ok(expected) = hex::decode(token) else {
                    return false;
                };
                mac(secret, device_id).verify_slice(&expected).is_ok()
            }
        }
    }
}

fn mac(secret: &Secret, device_id: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(device_id.as_bytes());
    mac
}

/// The token a device must present: what provisioning tools and `devsim` compute.
pub fn device_token(secret: &Secret, device_id: &str) -> String {
    hex::encode(mac(secret, device_id).finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_for_their_device_and_secret() {
        let secret = Secret::new("fleet-secret");
        let auth = DeviceAuth::Hmac(secret.clone());
        let token = device_token(&secret, "dev-1");
        assert_eq!(token.len(), 64);
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert!(auth.verify("dev-1", &token));
        assert!(!auth.verify("dev-2", &token));
        assert!(!auth.verify("dev-1", &device_token(&Secret::new("other"), "dev-1")));
        assert!(!auth.verify("dev-1", ""));
        assert!(!auth.verify("dev-1", "not hex"));
        assert!(!auth.verify("dev-1", &token[..62]));
    }

    #[test]
    fn known_vector() {
        // RFC 4231-style check against an independently computed value:
        // python3 -c "import hmac,hashlib;print(hmac.new(b'key',b'The quick brown fox jumps over the lazy dog',hashlib.sha256).hexdigest())"
        assert_eq!(
            device_token(
                &Secret::new("key"),
                "The quick brown fox jumps over the lazy dog"
            ),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn the_documented_example_token_holds() {
        // docs/protocol.md, "Tokens": secret `fleet-secret-0123456789`, id `dev-1`.
        const DOCUMENTED: &str = "6e12a0ba7a61f5ebd51fe563caa421218fec853d18abd795bb094a603b3e10d6";
        let secret = Secret::new("fleet-secret-0123456789");
        assert_eq!(device_token(&secret, "dev-1"), DOCUMENTED);

        let auth = DeviceAuth::Hmac(secret);
        assert!(auth.verify("dev-1", DOCUMENTED));
        // "upper-case hex is accepted too"
        assert!(auth.verify("dev-1", &DOCUMENTED.to_ascii_uppercase()));
        // Any single hex digit changed, wherever it is, is refused.
        for i in 0..DOCUMENTED.len() {
            let mut digits: Vec<char> = DOCUMENTED.chars().collect();
            let d = digits[i]
                .to_digit(16)
                .unwrap_or_else(|| unreachable!("hex"));
            digits[i] = std::char::from_digit((d + 1) % 16, 16).unwrap_or_else(|| unreachable!());
            let changed: String = digits.into_iter().collect();
            assert!(
                !auth.verify("dev-1", &changed),
                "digit {i} changed: {changed}"
            );
        }
    }

    #[test]
    fn insecure_mode_accepts_anything() {
        assert!(DeviceAuth::Insecure.verify("d", ""));
    }
}
