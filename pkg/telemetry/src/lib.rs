//! Telemetry for poem services: the tracing subscriber and the correlation-id middleware.
//!
//! - [`init`] installs a `tracing-subscriber` in `pretty` or `json` format with an env filter
//!   (`RUST_LOG` wins over the configured filter).
//! - [`CorrelationId`] gives every request a span carrying its `X-Correlation-Id` (echoed when the
//!   caller sent a sane one, generated otherwise) and returns the id on every response.
//! - [`Chain`] logs an error with its causes (`outer: inner: root`), so errors can keep their
//!   causes as sources instead of pasting them into their own message.

#![forbid(unsafe_code)]

use std::time::Instant;

use poem::http::HeaderValue;
use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

/// The header that carries a request's correlation id.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// An error and its sources, displayed as `outer: inner: root`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'a));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// Log output format (`telemetry.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, multi-line.
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber. Later calls (as in tests) are ignored.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _already_set = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The correlation id of the current request, stored in the request extensions.
#[derive(Debug, Clone)]
pub struct CorrelationIdValue(pub String);

/// Middleware: a span per request with its correlation id, echoed on the response.
#[derive(Debug, Clone, Copy, Default)]
pub struct CorrelationId;

impl<E: Endpoint> Middleware<E> for CorrelationId {
    type Output = CorrelationIdEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        CorrelationIdEndpoint { inner }
    }
}

/// The endpoint produced by [`CorrelationId`].
#[derive(Debug)]
pub struct CorrelationIdEndpoint<E> {
    inner: E,
}

/// Accepts a caller's id only when it is short, visible ASCII; anything else is replaced so a
/// hostile header cannot forge log lines.
fn accepted(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let ok = !text.is_empty() && text.len() <= 128 && text.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| text.to_owned())
}

impl<E: Endpoint> Endpoint for CorrelationIdEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> Result<Self::Output> {
        let id = req
            .headers()
            .get(CORRELATION_HEADER)
            .and_then(accepted)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        req.extensions_mut().insert(CorrelationIdValue(id.clone()));
        let span = tracing::info_span!(
            "request",
            correlation_id = %id,
            method = %req.method(),
            path = %req.uri().path(),
        );
        async move {
            let started = Instant::now();
            let mut response = match self.inner.call(req).await {
                Ok(output) => output.into_response(),
                Err(error) => error.into_response(),
            };
            if let Ok(value) = HeaderValue::from_str(&id) {
                response.headers_mut().insert(CORRELATION_HEADER, value);
            }
            tracing::info!(
                status = response.status().as_u16(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "request finished"
            );
            Ok(response)
        }
        .instrument(span)
        .await
    }
}

/// Masks a phone number for logs: keeps the `+`, the first two and last two digits.
pub fn mask_phone(phone: &str) -> String {
    let chars: Vec<char> = phone.chars().collect();
    if chars.len() <= 5 {
        return "*".repeat(chars.len());
    }
    let keep_head = if chars[0] == '+' { 3 } else { 2 };
    chars
        .iter()
        .enumerate()
        .map(|(i, c)| if i < keep_head || i >= chars.len() - 2 { *c } else { '*' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_shows_every_cause() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("could not write")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error = Outer(std::io::Error::other("disk full"));
        assert_eq!(Chain(&error).to_string(), "could not write: disk full");
    }
    use poem::{handler, test::TestClient, EndpointExt, Route};

    #[handler]
    fn hello() -> &'static str {
        "hi"
    }

    #[tokio::test]
    async fn echoes_a_sane_correlation_id_and_generates_one_otherwise() {
        let app = Route::new().at("/", hello).with(CorrelationId);
        let client = TestClient::new(app);
        let echoed = client.get("/").header(CORRELATION_HEADER, "abc-123").send().await;
        echoed.assert_header(CORRELATION_HEADER, "abc-123");
        let generated = client
            .get("/")
            .header(CORRELATION_HEADER, "bad value with spaces")
            .send()
            .await;
        let value = generated
            .0
            .headers()
            .get(CORRELATION_HEADER)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(value.len(), 36, "{value}");
        let missing = client.get("/nope").send().await;
        assert!(missing.0.headers().contains_key(CORRELATION_HEADER));
    }

    #[test]
    fn masks_phone_numbers() {
        assert_eq!(mask_phone("+905551234567"), "+90********67");
        assert_eq!(mask_phone("123"), "***");
    }
}
