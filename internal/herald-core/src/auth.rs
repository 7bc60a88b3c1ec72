//! Bearer API keys and their scopes.
//!
//! A key is known by its SHA-256 digest (`[[auth.keys]]`, `sha256 = "…"`; a plaintext `key` only
//! in the `local` and `test` environments) and holds [`Scope`]s; the legacy `auth.api_keys` are
//! keys with every scope. A presented key is hashed and compared with every known digest in
//! constant time, so timing tells neither which key matched nor how much of one.
//!
//! Each operation says the scope it needs by the type of its auth parameter: [`WriteKey`],
//! [`ReadKey`], [`WorkerKey`], [`OperatorKey`], [`MetricsKey`]. poem-openapi documents each as its
//! own security scheme; [`scoped_spec`] folds them back into one `BearerAuth` scheme (one
//! "Authorize" in Swagger UI) and writes the scope on each operation as `x-herald-scope`. An
//! unknown key is `401001`; a known key without the scope is `403001`, naming the scope.

use std::fmt;
use std::sync::Arc;

use layered_config::{ExposeSecret, SecretString};
use poem::Request;
use poem_openapi::auth::Bearer;
use poem_openapi::SecurityScheme;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::errors::{ApiError, ErrorCode};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Scope {
    /// Create messages (one or a batch).
    #[serde(rename = "messages:write")]
    MessagesWrite,
    /// Read messages (pages, one by id) and follow the live feed.
    #[serde(rename = "messages:read")]
    MessagesRead,
    /// What a Job Scheduler does: claim, report outcomes, commit, fail, release.
    #[serde(rename = "worker")]
    Worker,
    /// What an operator does: start and stop the job, re-queue failed messages.
    #[serde(rename = "operator")]
    Operator,
    /// Read the stats, the run history and the job's state (no phone numbers).
    #[serde(rename = "metrics")]
    Metrics,
}

impl Scope {
    /// Every scope, in the order the documentation lists them.
    pub const ALL: [Scope; 5] = [
        Scope::MessagesWrite,
        Scope::MessagesRead,
        Scope::Worker,
        Scope::Operator,
        Scope::Metrics,
    ];

    /// The name used in configuration, errors and `x-herald-scope`.
    pub const fn name(self) -> &'static str {
        match self {
            Scope::MessagesWrite => "messages:write",
            Scope::MessagesRead => "messages:read",
            Scope::Worker => "worker",
            Scope::Operator => "operator",
            Scope::Metrics => "metrics",
        }
    }

    /// The scope named `name`, if there is one.
    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.name() == name)
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// Every scope (the legacy `auth.api_keys`).
    pub fn all() -> Self {
        Self::from_iter(Scope::ALL)
    }

    /// True when `scope` is in the set.
    pub fn has(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Self(iter.into_iter().fold(0, |bits, s| bits | s.bit()))
    }
}

/// A fresh random key: `hk_` and 32 bytes from `rand`'s thread generator (a CSPRNG seeded by
/// the operating system), base64url.
pub fn new_key() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    format!("hk_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The hex SHA-256 digest of a key, as `[[auth.keys]] sha256` holds it.
pub fn digest_hex(key: &str) -> String {
    hex::encode(digest(key))
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// One accepted key: its name (for logs and the audit), its digest and its scopes.
#[derive(Clone)]
struct Key {
    name: Arc<str>,
    digest: [u8; 32],
    scopes: Scopes,
}

/// Who made a request: the key's name and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's name (`api_keys[N]` for a legacy key).
    pub name: Arc<str>,
    /// What it may do.
    pub scopes: Scopes,
}

/// Why a key was not let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such key (`401001`).
    Unknown,
    /// The key is known and lacks the scope (`403001`).
    MissingScope {
        /// The key's name.
        key: Arc<str>,
        /// The scope the operation needs.
        scope: Scope,
    },
}

impl Refusal {
    /// The error this refusal answers with.
    pub fn error(&self) -> ApiError {
        match self {
            Refusal::Unknown => ApiError::new(ErrorCode::Unauthorized, "The bearer key is not accepted."),
            Refusal::MissingScope { key, scope } => ApiError::new(
                ErrorCode::MissingScope,
                format!("The key {key:?} lacks the scope \"{scope}\" this operation needs."),
            ),
        }
    }
}

/// A key as configured: `[[auth.keys]]` or one of the legacy `auth.api_keys`.
pub struct KeySpec<'a> {
    /// Its name.
    pub name: String,
    /// Its hex SHA-256 digest, or its plaintext.
    pub secret: KeySecret<'a>,
    /// What it may do.
    pub scopes: Scopes,
}

/// How a configured key is given.
pub enum KeySecret<'a> {
    /// `sha256 = "<64 hex>"`.
    Sha256(&'a str),
    /// `key = "…"` (local and test only) or a legacy `auth.api_keys` entry.
    Plain(&'a SecretString),
}

/// The accepted keys, shared by every request.
#[derive(Clone)]
pub struct ApiKeys(Arc<Vec<Key>>);

impl ApiKeys {
    /// The keys, from their specs. A digest that is not 64 hex characters is an error naming
    /// the key (settings validation reports it before any server starts).
    pub fn from_specs<'a>(specs: impl IntoIterator<Item = KeySpec<'a>>) -> Result<Self, String> {
        let mut keys = Vec::new();
        for spec in specs {
            let digest = match spec.secret {
                KeySecret::Plain(key) => digest(key.expose_secret()),
                KeySecret::Sha256(hex_digest) => {
                    let mut out = [0u8; 32];
                    hex::decode_to_slice(hex_digest.trim(), &mut out)
                        .map_err(|_| format!("auth.keys {:?}: sha256 must be 64 hex characters", spec.name))?;
                    out
                }
            };
            keys.push(Key {
                name: spec.name.into(),
                digest,
                scopes: spec.scopes,
            });
        }
        Ok(Self(Arc::new(keys)))
    }

    /// Legacy keys, each with every scope (tests and tools).
    pub fn new(keys: Vec<SecretString>) -> Self {
        let specs: Vec<KeySpec<'_>> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| KeySpec {
                name: format!("api_keys[{i}]"),
                secret: KeySecret::Plain(key),
                scopes: Scopes::all(),
            })
            .collect();
        Self::from_specs(specs).unwrap_or_else(|_| Self(Arc::new(Vec::new())))
    }

    /// Who presents `presented`, if anyone. Every digest is compared, each in constant time.
    pub fn identify(&self, presented: &str) -> Option<Caller> {
        let presented = digest(presented);
        let mut found = None;
        for key in self.0.iter() {
            if bool::from(key.digest.ct_eq(&presented)) {
                found = Some(Caller {
                    name: key.name.clone(),
                    scopes: key.scopes,
                });
            }
        }
        found
    }

    /// The caller presenting `presented` when its key holds `scope`.
    pub fn authorize(&self, presented: &str, scope: Scope) -> Result<Caller, Refusal> {
        let caller = self.identify(presented).ok_or(Refusal::Unknown)?;
        if caller.scopes.has(scope) {
            Ok(caller)
        } else {
            Err(Refusal::MissingScope {
                key: caller.name,
                scope,
            })
        }
    }

    /// True when `presented` is any accepted key, whatever its scopes.
    pub fn accepts(&self, presented: &str) -> bool {
        self.identify(presented).is_some()
    }
}

fn check(req: &Request, bearer: &Bearer, scope: Scope) -> poem::Result<Caller> {
    let keys = req.data::<ApiKeys>().ok_or(Refusal::Unknown).map_err(|r| r.error())?;
    keys.authorize(&bearer.token, scope).map_err(|r| r.error().into())
}

/// The security scheme each operation's auth parameter names, and the scope it stands for.
pub const SCHEMES: [(&str, Scope); 5] = [
    ("WriteKey", Scope::MessagesWrite),
    ("ReadKey", Scope::MessagesRead),
    ("WorkerKey", Scope::Worker),
    ("OperatorKey", Scope::Operator),
    ("MetricsKey", Scope::Metrics),
];

macro_rules! scoped_key {
    ($name:ident, $checker:ident, $checker_name:literal, $scope:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(SecurityScheme)]
        #[oai(ty = "bearer", checker = $checker_name)]
        pub struct $name(pub Caller);

        async fn $checker(req: &Request, bearer: Bearer) -> poem::Result<Caller> {
            check(req, &bearer, $scope)
        }
    };
}

scoped_key!(
    WriteKey,
    check_write,
    "check_write",
    Scope::MessagesWrite,
    "A bearer key with the `messages:write` scope."
);
scoped_key!(
    ReadKey,
    check_read,
    "check_read",
    Scope::MessagesRead,
    "A bearer key with the `messages:read` scope."
);
scoped_key!(
    WorkerKey,
    check_worker,
    "check_worker",
    Scope::Worker,
    "A bearer key with the `worker` scope."
);
scoped_key!(
    OperatorKey,
    check_operator,
    "check_operator",
    Scope::Operator,
    "A bearer key with the `operator` scope."
);
scoped_key!(
    MetricsKey,
    check_metrics,
    "check_metrics",
    Scope::Metrics,
    "A bearer key with the `metrics` scope."
);

/// The OpenAPI document as clients see it: the per-scope schemes folded into one
/// `BearerAuth`, and each operation's scope in `x-herald-scope`.
pub fn scoped_spec(spec: &str) -> String {
    let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(spec) else {
        return spec.to_owned();
    };
    if let Some(paths) = doc["paths"].as_object_mut() {
        for operation in paths
            .values_mut()
            .filter_map(|p| p.as_object_mut())
            .flat_map(|p| p.values_mut())
        {
            let scope = operation["security"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|requirement| requirement.as_object())
                .flat_map(|requirement| requirement.keys())
                .find_map(|scheme| SCHEMES.iter().find(|(name, _)| name == scheme).map(|(_, s)| *s));
            if let Some(scope) = scope {
                operation["security"] = serde_json::json!([{"BearerAuth": []}]);
                operation["x-herald-scope"] = serde_json::json!(scope.name());
            } else if operation["operationId"] == "takeReceipt" {
                // Providers cannot hold a key: their receipts carry their own signature.
                operation["x-herald-auth"] = serde_json::json!("provider-signature");
            }
        }
    }
    if let Some(schemes) = doc["components"]["securitySchemes"].as_object_mut() {
        schemes.retain(|name, _| !SCHEMES.iter().any(|(scheme, _)| scheme == name));
        schemes.insert(
            "BearerAuth".into(),
            serde_json::json!({
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <key>`. Each operation names the scope its key needs in `x-herald-scope`: messages:write, messages:read, worker, operator or metrics."
            }),
        );
    }
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| spec.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        let plain = SecretString::from("writer-key");
        let reader_digest = digest_hex("reader-key");
        ApiKeys::from_specs([
            KeySpec {
                name: "shop".into(),
                secret: KeySecret::Plain(&plain),
                scopes: Scopes::from_iter([Scope::MessagesWrite]),
            },
            KeySpec {
                name: "dashboard".into(),
                secret: KeySecret::Sha256(&reader_digest),
                scopes: Scopes::from_iter([Scope::MessagesRead, Scope::Metrics]),
            },
        ])
        .unwrap()
    }

    #[test]
    fn a_key_is_known_by_its_digest_and_holds_only_its_scopes() {
        let keys = keys();
        assert_eq!(
            &*keys.authorize("writer-key", Scope::MessagesWrite).unwrap().name,
            "shop"
        );
        assert_eq!(
            keys.authorize("writer-key", Scope::Operator),
            Err(Refusal::MissingScope {
                key: "shop".into(),
                scope: Scope::Operator
            })
        );
        assert_eq!(
            &*keys.authorize("reader-key", Scope::Metrics).unwrap().name,
            "dashboard"
        );
        assert_eq!(keys.authorize("reader-ke", Scope::Metrics), Err(Refusal::Unknown));
        assert_eq!(keys.authorize("", Scope::Metrics), Err(Refusal::Unknown));
    }

    #[test]
    fn legacy_keys_hold_every_scope() {
        let keys = ApiKeys::new(vec![SecretString::from("one"), SecretString::from("two")]);
        for scope in Scope::ALL {
            assert_eq!(&*keys.authorize("two", scope).unwrap().name, "api_keys[1]");
        }
        assert!(!keys.accepts("three"));
    }

    #[test]
    fn a_digest_that_is_not_hex_names_its_key() {
        let err = ApiKeys::from_specs([KeySpec {
            name: "bad".into(),
            secret: KeySecret::Sha256("xyz"),
            scopes: Scopes::all(),
        }])
        .err()
        .unwrap();
        assert!(err.contains("\"bad\""), "{err}");
    }

    #[test]
    fn scope_names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.name()), Some(scope));
        }
        assert_eq!(Scope::parse("admin"), None);
    }
}
