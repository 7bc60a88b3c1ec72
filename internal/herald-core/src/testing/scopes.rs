//! The scope check both services' tests run from their own published OpenAPI document: every
//! operation but the probes declares `x-herald-scope`; a key holding every other scope gets
//! `403001` naming the missing one; a key holding the scope gets past auth.

use serde_json::Value;

use crate::auth::Scope;
use crate::settings::{KeySettings, Settings};

/// One plaintext key per scope (named after it) and one holding every scope but it
/// (`all-but-<scope>`), added to `settings` (plaintext keys are a `test` environment thing).
pub fn add_scoped_keys(settings: &mut Settings) {
    for scope in Scope::ALL {
        settings.auth.keys.push(KeySettings {
            key: Some(key_for(scope).into()),
            ..KeySettings::new(scope.name().replace(':', "-"), vec![scope])
        });
        settings.auth.keys.push(KeySettings {
            key: Some(key_without(scope).into()),
            ..KeySettings::new(
                format!("all-but-{}", scope.name().replace(':', "-")),
                Scope::ALL.into_iter().filter(|s| *s != scope).collect(),
            )
        });
    }
    if let Err(error) = settings.validate() {
        panic!("scoped keys: {error}");
    }
}

/// [`add_scoped_keys`], and each service presenting a key with only the scope its calls need:
/// the scheduler `worker`, the toggle `operator`.
pub fn scoped_services(settings: &mut Settings) {
    settings.job_scheduler.api_key = key_for(Scope::Worker).into();
    settings.messenger_api.scheduler_key = key_for(Scope::Operator).into();
    add_scoped_keys(settings);
}

/// The test key holding only `scope`.
pub fn key_for(scope: Scope) -> String {
    format!("key-only-{}", scope.name())
}

/// The test key holding every scope but `scope`.
pub fn key_without(scope: Scope) -> String {
    format!("key-all-but-{}", scope.name())
}

/// What [`check_every_operation`] saw, for the test's own assertions.
#[derive(Debug, Default)]
pub struct ScopeReport {
    /// `METHOD path scope` of every operation checked.
    pub checked: Vec<String>,
}

/// Calls every operation of the document at `base` + `spec_path` three ways (no key, a key
/// without its scope, a key with only its scope) and asserts the answers. Path parameters get a
/// well-formed id; bodies are `{}`, so an authorised call stops at validation and changes
/// nothing.
pub async fn check_every_operation(base: &str, spec_path: &str) -> ScopeReport {
    let client = reqwest::Client::new();
    let doc: Value = client
        .get(format!("{base}{spec_path}"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("{spec_path}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{spec_path}: {e}"));
    assert_eq!(
        doc["components"]["securitySchemes"]
            .as_object()
            .map(|s| s.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["BearerAuth".to_owned()]),
        "one scheme, so Swagger UI asks for one key"
    );
    let mut report = ScopeReport::default();
    for (path, operations) in doc["paths"].as_object().into_iter().flatten() {
        for (method, operation) in operations.as_object().into_iter().flatten() {
            let label = format!("{} {path}", method.to_uppercase());
            let probe = path.ends_with("/health") || path.ends_with("/ready");
            if operation["x-herald-auth"] == "provider-signature" {
                // Signed by the provider (receipts), never by a key: checked in its own tests.
                assert!(operation.get("security").is_none(), "{label}: no bearer key");
                continue;
            }
            let Some(scope) = operation["x-herald-scope"].as_str() else {
                assert!(probe, "{label} declares no x-herald-scope");
                assert!(operation.get("security").is_none(), "{label}: a probe is open");
                continue;
            };
            assert!(!probe, "{label}: a probe needs no key");
            let scope = Scope::parse(scope).unwrap_or_else(|| panic!("{label}: unknown scope {scope}"));
            assert_eq!(
                operation["security"],
                serde_json::json!([{"BearerAuth": []}]),
                "{label}"
            );
            assert!(operation["responses"]["403"].is_object(), "{label} documents its 403");
            let url = format!("{base}{}", path.replace("{id}", "0123456789abcdef01234567"));
            let (status, body) = call(&client, method, &url, None).await;
            assert_eq!(
                (status, body["internalCode"].as_u64()),
                (401, Some(401001)),
                "{label} without a key"
            );
            let (status, body) = call(&client, method, &url, Some(key_without(scope))).await;
            assert_eq!(
                (status, body["internalCode"].as_u64()),
                (403, Some(403001)),
                "{label} with every scope but {scope}: {body}"
            );
            assert!(
                body["message"].as_str().unwrap_or_default().contains(scope.name()),
                "{label}: the 403 names the scope: {body}"
            );
            let (status, body) = call(&client, method, &url, Some(key_for(scope))).await;
            assert!(
                // Past auth: validation, not found, or the other service not running here.
                !matches!(status, 401 | 403 | 500),
                "{label} with only {scope}: {status} {body}"
            );
            report.checked.push(format!("{label} {scope}"));
        }
    }
    report
}

/// One call: `{}` as the body of a POST or PUT; the status and the JSON body (none for an event
/// stream, which never ends: its status is the answer).
async fn call(client: &reqwest::Client, method: &str, url: &str, key: Option<String>) -> (u16, Value) {
    let mut request = client.request(method.to_uppercase().parse().expect("method"), url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if method == "post" || method == "put" {
        request = request.json(&serde_json::json!({}));
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status().as_u16();
    let streaming = response
        .headers()
        .get("content-type")
        .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
    let body = if streaming {
        Value::Null
    } else {
        response.json().await.unwrap_or(Value::Null)
    };
    (status, body)
}
