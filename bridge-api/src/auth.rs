//! Bearer-token authentication of API callers.
//!
//! Tokens come from configuration (several may be valid at once, for rotation). A presented
//! token is hashed and compared with every configured token's hash in constant time, so neither
//! the content nor the length of a valid token leaks through response timing.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use devgate_gateway::common::Secret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Who may call the API.
#[derive(Clone)]
pub enum ApiAuth {
    /// Callers must present one of these tokens (stored as SHA-256 digests).
    Tokens(Arc<Vec<[u8; 32]>>),
    /// Everyone may call: only for local runs (`--insecure-no-auth`).
    Insecure,
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiAuth::Tokens(t) => write!(f, "Tokens({} configured)", t.len()),
            ApiAuth::Insecure => f.write_str("Insecure"),
        }
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl ApiAuth {
    /// Token authentication with `tokens`, or [`ApiAuth::Insecure`] when `insecure` (config
    /// validation makes sure exactly one of the two is asked for).
    pub fn new(tokens: &[Secret], insecure: bool) -> Self {
        if insecure {
            tracing::warn!(
                "!!! --insecure-no-auth: the HTTP API accepts EVERY caller without a token; \
                 anyone who reaches this port can message and disconnect devices. \
                 Use this only on a laptop. !!!"
            );
            return ApiAuth::Insecure;
        }
        ApiAuth::Tokens(Arc::new(
            tokens
                .iter()
                .map(|t| digest(t.expose().as_bytes()))
                .collect(),
        ))
    }

    /// Whether an `Authorization` header value grants access.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let ApiAuth::Tokens(valid) = self else {
            return true;
        };
        let Some(presented) = authorization.and_then(bearer_token) else {
            return false;
        };
        let presented = digest(presented);
        // Check every configured token, without stopping early, so timing does not tell which
        // position matched.
        let mut ok = subtle::Choice::from(0u8);
        for v in valid.iter() {
            ok |= v.ct_eq(&presented);
        }
        ok.into()
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Middleware: refuses requests without a valid bearer token with `401 unauthorized`.
pub async fn require_token(
    State(auth): State<ApiAuth>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if auth.allows(header) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_bearer_tokens_pass() {
        let auth = ApiAuth::new(
            &[
                Secret::new("token-one-0123456789"),
                Secret::new("token-two-0123456789"),
            ],
            false,
        );
        assert!(auth.allows(Some(b"Bearer token-one-0123456789")));
        assert!(auth.allows(Some(b"bearer token-two-0123456789")));
        assert!(!auth.allows(None));
        assert!(!auth.allows(Some(b"Bearer token-one")));
        assert!(!auth.allows(Some(b"Bearer ")));
        assert!(!auth.allows(Some(b"Basic token-one-0123456789")));
        assert!(!auth.allows(Some(b"token-one-0123456789")));
        assert!(ApiAuth::new(&[], true).allows(None));
    }
}
