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
    Hmac {
        /// The fleet secret tokens are issued under now.
        current: Secret,
        /// During a rotation, the secret the fleet's tokens were issued under before: a fleet
        /// cannot be re-provisioned in one instant, so both are accepted until every device
        /// has its new token (counted by [`Verdict::PreviousSecret`]).
        previous: Option<Secret>,
    },
    /// The client certificate alone (`--device-auth certificate`): the token is not looked
    /// at; the login goes on only if the TLS client certificate, verified against
    /// `device_tls_client_ca`, names the device id (checked right after this verdict).
    Certificate,
    /// No authentication: only when explicitly asked for (`--insecure-no-auth`).
    Insecure,
}

/// What a token check concluded: whether to admit the device, and under which secret, so a
/// rotation's progress can be measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid under the current fleet secret (or authentication is off).
    Current,
    /// Valid only under the previous fleet secret: this device still needs its new token.
    PreviousSecret,
    /// Not a valid token for this device.
    Refused,
}

impl Verdict {
    /// Whether the device may log in.
    pub fn admits(self) -> bool {
        self != Verdict::Refused
    }
}

impl std::fmt::Debug for DeviceAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceAuth::Hmac { previous: None, .. } => f.write_str("Hmac(***)"),
            DeviceAuth::Hmac {
                previous: Some(_), ..
            } => f.write_str("Hmac(***, previous ***)"),
            DeviceAuth::Certificate => f.write_str("Certificate"),
            DeviceAuth::Insecure => f.write_str("Insecure"),
        }
    }
}

impl DeviceAuth {
    /// Checks `token` for `device_id` in constant time (per secret tried).
    pub fn verify(&self, device_id: &str, token: &str) -> Verdict {
        match self {
            DeviceAuth::Insecure | DeviceAuth::Certificate => Verdict::Current,
            DeviceAuth::Hmac { current, previous } => {
                let Ok(presented) = hex::decode(token) else {
                    return Verdict::Refused;
                };
                if mac(current, device_id).verify_slice(&presented).is_ok() {
                    Verdict::Current
                } else if previous
                    .as_ref()
                    .is_some_and(|p| mac(p, device_id).verify_slice(&presented).is_ok())
                {
                    Verdict::PreviousSecret
                } else {
                    Verdict::Refused
                }
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
        let auth = hmac_only(&secret);
        let token = device_token(&secret, "dev-1");
        assert_eq!(token.len(), 64);
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(auth.verify("dev-1", &token), Verdict::Current);
        assert!(!auth.verify("dev-2", &token).admits());
        assert!(
            !auth
                .verify("dev-1", &device_token(&Secret::new("other"), "dev-1"))
                .admits()
        );
        assert!(!auth.verify("dev-1", "").admits());
        assert!(!auth.verify("dev-1", "not hex").admits());
        assert!(!auth.verify("dev-1", &token[..62]).admits());
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

        let auth = hmac_only(&secret);
        assert!(auth.verify("dev-1", DOCUMENTED).admits());
        // "upper-case hex is accepted too"
        assert!(
            auth.verify("dev-1", &DOCUMENTED.to_ascii_uppercase())
                .admits()
        );
        // Any single hex digit changed, wherever it is, is refused.
        for i in 0..DOCUMENTED.len() {
            let mut digits: Vec<char> = DOCUMENTED.chars().collect();
            let d = digits[i]
                .to_digit(16)
                .unwrap_or_else(|| unreachable!("hex"));
            digits[i] = std::char::from_digit((d + 1) % 16, 16).unwrap_or_else(|| unreachable!());
            let changed: String = digits.into_iter().collect();
            assert!(
                !auth.verify("dev-1", &changed).admits(),
                "digit {i} changed: {changed}"
            );
        }
    }

    #[test]
    fn insecure_mode_accepts_anything() {
        assert!(DeviceAuth::Insecure.verify("d", "").admits());
    }

    fn hmac_only(secret: &Secret) -> DeviceAuth {
        DeviceAuth::Hmac {
            current: secret.clone(),
            previous: None,
        }
    }

    #[test]
    fn during_a_rotation_both_secrets_admit_and_say_which() {
        let old = Secret::new("old-fleet-secret-1");
        let new = Secret::new("new-fleet-secret-2");
        let rotating = DeviceAuth::Hmac {
            current: new.clone(),
            previous: Some(old.clone()),
        };
        assert_eq!(
            rotating.verify("dev-1", &device_token(&new, "dev-1")),
            Verdict::Current
        );
        assert_eq!(
            rotating.verify("dev-1", &device_token(&old, "dev-1")),
            Verdict::PreviousSecret
        );
        // The previous secret's token is still bound to its device.
        assert_eq!(
            rotating.verify("dev-2", &device_token(&old, "dev-1")),
            Verdict::Refused
        );
        assert_eq!(
            rotating.verify(
                "dev-1",
                &device_token(&Secret::new("a-third-secret-3"), "dev-1")
            ),
            Verdict::Refused
        );
        // Once the rotation is over, the old token no longer admits.
        assert_eq!(
            hmac_only(&new).verify("dev-1", &device_token(&old, "dev-1")),
            Verdict::Refused
        );
        assert!(!format!("{rotating:?}").contains("fleet-secret"));
    }
}
