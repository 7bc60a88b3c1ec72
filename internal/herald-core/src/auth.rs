//! Bearer API keys.
//!
//! Every non-probe route declares [`BearerAuth`]; its checker reads the [`ApiKeys`] attached to
//! the app with `.data(...)` and compares in constant time. A missing or unknown key becomes the
//! `401001` JSON error.

use std::sync::Arc;

use layered_config::{ExposeSecret, SecretString};
use poem::Request;
use poem_openapi::auth::Bearer;
use poem_openapi::SecurityScheme;
use subtle::ConstantTimeEq;

use crate::errors::{ApiError, ErrorCode};

/// The accepted keys, shared by every request.
#[derive(Clone)]
pub struct ApiKeys(Arc<Vec<SecretString>>);

impl ApiKeys {
    /// Wraps the configured keys.
    pub fn new(keys: Vec<SecretString>) -> Self {
        Self(Arc::new(keys))
    }

    /// True when `presented` equals one of the keys. Every key is compared, each in constant
    /// time, so timing does not tell which key (or which prefix) matched.
    pub fn accepts(&self, presented: &str) -> bool {
        let mut matched = subtle::Choice::from(0);
        for key in self.0.iter() {
            matched |= key.expose_secret().as_bytes().ct_eq(presented.as_bytes());
        }
        matched.into()
    }
}

/// `Authorization: Bearer <key>` with a key from `auth.api_keys`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", checker = "check_bearer")]
pub struct BearerAuth(());

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<()> {
    let accepted = req
        .data::<ApiKeys>()
        .map(|keys| keys.accepts(&bearer.token))
        .unwrap_or(false);
    if accepted {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::Unauthorized, "The bearer key is not accepted.").into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_any_configured_key_and_nothing_else() {
        let keys = ApiKeys::new(vec![SecretString::from("one"), SecretString::from("two")]);
        assert!(keys.accepts("one"));
        assert!(keys.accepts("two"));
        assert!(!keys.accepts("on"));
        assert!(!keys.accepts(""));
        assert!(!keys.accepts("three"));
    }
}
