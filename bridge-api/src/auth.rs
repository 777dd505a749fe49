//! Bearer-token authentication of API callers.
//!
//! Tokens come from configuration (several may be valid at once, for rotation). A presented
//! token is hashed and compared with every configured token's hash in constant time, so neither
//! the content nor the length of a valid token leaks through response timing.
//!
//! There are two grants. A full token (`--api-token`) may do everything; a read token
//! (`--api-read-token`) only what a `GET` does (presence, listings, tails), so a dashboard's
//! token, which lives in more places, cannot message or disconnect devices.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;
use devgate_gateway::common::Secret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Who may call the API.
#[derive(Clone)]
pub enum ApiAuth {
    /// Callers must present one of these tokens (stored as SHA-256 digests, each with what it
    /// grants).
    Tokens(Arc<Vec<([u8; 32], Grant)>>),
    /// Everyone may call: only for local runs (`--insecure-no-auth`).
    Insecure,
}

/// What a valid token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Every endpoint.
    Full,
    /// `GET` (and `HEAD`) only.
    ReadOnly,
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiAuth::Tokens(t) => {
                let read = t.iter().filter(|(_, g)| *g == Grant::ReadOnly).count();
                write!(f, "Tokens({} full, {read} read-only)", t.len() - read)
            }
            ApiAuth::Insecure => f.write_str("Insecure"),
        }
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl ApiAuth {
    /// Token authentication with full `tokens` and `read_tokens`, or [`ApiAuth::Insecure`]
    /// when `insecure` (config validation makes sure exactly one of the two is asked for).
    pub fn new(tokens: &[Secret], read_tokens: &[Secret], insecure: bool) -> Self {
        if insecure {
            tracing::warn!(
                "!!! --insecure-no-auth: the HTTP API accepts EVERY caller without a token; \
                 anyone who reaches this port can message and disconnect devices. \
                 Use this only on a laptop. !!!"
            );
            return ApiAuth::Insecure;
        }
        let with = |tokens: &[Secret], grant| {
            tokens
                .iter()
                .map(move |t| (digest(t.expose().as_bytes()), grant))
                .collect::<Vec<_>>()
        };
        let mut all = with(tokens, Grant::Full);
        all.extend(with(read_tokens, Grant::ReadOnly));
        ApiAuth::Tokens(Arc::new(all))
    }

    /// What an `Authorization` header value grants, if anything.
    pub fn grant(&self, authorization: Option<&[u8]>) -> Option<Grant> {
        let ApiAuth::Tokens(valid) = self else {
            return Some(Grant::Full);
        };
        let presented = digest(authorization.and_then(bearer_token)?);
        // Check every configured token, without stopping early, so timing does not tell which
        // position (or which kind of token) matched.
        let mut full = subtle::Choice::from(0u8);
        let mut read = subtle::Choice::from(0u8);
        for (v, grant) in valid.iter() {
            let hit = v.ct_eq(&presented);
            match grant {
                Grant::Full => full |= hit,
                Grant::ReadOnly => read |= hit,
            }
        }
        if bool::from(full) {
            Some(Grant::Full)
        } else if bool::from(read) {
            Some(Grant::ReadOnly)
        } else {
            None
        }
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

/// Middleware: refuses requests without a valid bearer token with `401 unauthorized`, and
/// anything but a read with a read-only token with `403 forbidden`.
pub async fn require_token(
    State(auth): State<ApiAuth>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let grant = match auth.grant(header) {
        Some(Grant::ReadOnly) if !is_read(request.method()) => return Err(ApiError::Forbidden),
        Some(grant) => grant,
        None => return Err(ApiError::Unauthorized),
    };
    // Handlers whose limits depend on the caller's kind (the SSE tails) read it from here.
    request.extensions_mut().insert(grant);
    Ok(next.run(request).await)
}

/// Whether a request only reads: the methods a read token may use.
fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_bearer_tokens_pass_with_their_grant() {
        let auth = ApiAuth::new(
            &[
                Secret::new("token-one-0123456789"),
                Secret::new("token-two-0123456789"),
            ],
            &[Secret::new("reader-token-0123456789")],
            false,
        );
        let full = Some(Grant::Full);
        assert_eq!(auth.grant(Some(b"Bearer token-one-0123456789")), full);
        assert_eq!(auth.grant(Some(b"bearer token-two-0123456789")), full);
        assert_eq!(
            auth.grant(Some(b"Bearer reader-token-0123456789")),
            Some(Grant::ReadOnly)
        );
        assert_eq!(auth.grant(None), None);
        assert_eq!(auth.grant(Some(b"Bearer token-one")), None);
        assert_eq!(auth.grant(Some(b"Bearer ")), None);
        assert_eq!(auth.grant(Some(b"Basic token-one-0123456789")), None);
        assert_eq!(auth.grant(Some(b"token-one-0123456789")), None);
        assert_eq!(ApiAuth::new(&[], &[], true).grant(None), full);
        assert_eq!(format!("{auth:?}"), "Tokens(2 full, 1 read-only)");
    }
}
