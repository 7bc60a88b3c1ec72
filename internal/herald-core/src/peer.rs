//! One service calling the other: the key, the `User-Agent`, the caller's correlation id, and
//! failures that keep their cause.

use std::time::Duration;

use layered_config::{ExposeSecret, SecretString};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a call to the other service did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No answer: connection refused, reset or timed out.
    #[error("{path}: no answer")]
    Unreachable {
        /// The path called.
        path: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// An answer that was not a success.
    #[error("{path} answered {status}: {body}")]
    Status {
        /// The path called.
        path: String,
        /// Its status.
        status: StatusCode,
        /// The start of its body.
        body: String,
    },
    /// A success whose body could not be read as expected.
    #[error("{path}: unreadable answer")]
    Unreadable {
        /// The path called.
        path: String,
        /// The decoding error.
        #[source]
        source: reqwest::Error,
    },
}

impl PeerError {
    /// The status the other service answered with, when it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The answer's body, when it answered with a failure.
    pub fn body(&self) -> Option<&str> {
        match self {
            Self::Status { body, .. } => Some(body),
            _ => None,
        }
    }
}

/// An HTTP client of the other service.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    base: String,
    key: SecretString,
}

/// Most bytes of a failed answer's body kept in a [`PeerError::Status`].
const BODY_EXCERPT: usize = 512;

impl PeerClient {
    /// A client for `base_url`, presenting `key`, each call bounded by `timeout`.
    pub fn new(base_url: &str, key: SecretString, timeout: Duration) -> reqwest::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            // Well inside the other service's idle cut (more than 15 s in any valid
            // configuration), so a pooled connection is never reused as the server closes it.
            .pool_idle_timeout(Duration::from_secs(10))
            .user_agent(crate::USER_AGENT)
            .build()?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// A request to `path` with the key.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.key.expose_secret())
    }

    /// Sends `request` (to `path`) with the caller's correlation id; any answer but a success
    /// is a [`PeerError::Status`].
    pub async fn send(
        &self,
        path: &str,
        mut request: RequestBuilder,
        correlation_id: Option<&str>,
    ) -> Result<reqwest::Response, PeerError> {
        if let Some(id) = correlation_id {
            request = request.header(telemetry::CORRELATION_HEADER, id);
        }
        let response = request.send().await.map_err(|source| PeerError::Unreachable {
            path: path.to_owned(),
            source,
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let bytes = response.bytes().await.unwrap_or_default();
        let cut = bytes.len().min(BODY_EXCERPT);
        Err(PeerError::Status {
            path: path.to_owned(),
            status,
            body: String::from_utf8_lossy(&bytes[..cut]).into_owned(),
        })
    }

    /// Sends `body` as JSON with `method` to `path` and reads the JSON answer.
    pub async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
        correlation_id: Option<&str>,
    ) -> Result<T, PeerError> {
        let response = self
            .send(path, self.request(method, path).json(body), correlation_id)
            .await?;
        read(path, response).await
    }

    /// GETs `path` with `query` and reads the JSON answer.
    pub async fn get<Q: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
        correlation_id: Option<&str>,
    ) -> Result<T, PeerError> {
        let response = self
            .send(path, self.request(Method::GET, path).query(query), correlation_id)
            .await?;
        read(path, response).await
    }

    /// GETs an open `path` (no key), answering only whether it succeeded.
    pub async fn probe(&self, path: &str) -> Result<(), PeerError> {
        let request = self.http.get(format!("{}{path}", self.base));
        self.send(path, request, None).await.map(drop)
    }
}

async fn read<T: DeserializeOwned>(path: &str, response: reqwest::Response) -> Result<T, PeerError> {
    response.json().await.map_err(|source| PeerError::Unreadable {
        path: path.to_owned(),
        source,
    })
}
