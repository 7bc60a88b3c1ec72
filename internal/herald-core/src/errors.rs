//! The error catalogue and the JSON error body.
//!
//! `configs/errors.toml` lists every 6-digit internal code (first three digits = HTTP status).
//! [`ErrorCode`] names the codes the code base uses; [`check_catalogue`] proves at start-up (and
//! in a test) that each is listed exactly once. Every failure leaves a service as
//! `{"status", "internalCode", "message"}` through [`ApiError`].

use std::collections::{HashMap, HashSet};
use std::fmt;

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::Object;
use serde::Deserialize;

/// The catalogue as shipped, embedded at compile time.
pub const CATALOGUE: &str = include_str!("../../../configs/errors.toml");

macro_rules! error_codes {
    ($($name:ident = $code:literal,)+) => {
        /// Every internal error code Herald answers with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $(
                #[doc = concat!("Internal code ", stringify!($code), ".")]
                $name,
            )+
        }

        impl ErrorCode {
            /// All codes, for the catalogue check.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)+];

            /// The 6-digit code.
            pub const fn code(self) -> u32 {
                match self { $(ErrorCode::$name => $code,)+ }
            }
        }
    };
}

error_codes! {
    MalformedBody = 400001,
    InvalidParameter = 400002,
    InvalidPhone = 400003,
    EmptyContent = 400004,
    ContentTooLong = 400005,
    InvalidMessageId = 400006,
    InvalidBatch = 400007,
    BatchSize = 400008,
    InvalidPagination = 400009,
    InvalidCommand = 400010,
    InvalidClaimRequest = 400011,
    InvalidStatusFilter = 400012,
    InvalidIdempotencyKey = 400013,
    InvalidOutcomes = 400014,
    InvalidSendAt = 400015,
    InvalidExpiresAt = 400016,
    InvalidRequeueFilter = 400017,
    UnknownProvider = 400018,
    ReceiptUnreadable = 400019,
    InvalidCallbackUrl = 400020,
    InvalidCallbackReport = 400021,
    InvalidExtendRequest = 400022,
    Unauthorized = 401001,
    ReceiptUnauthorized = 401002,
    MissingScope = 403001,
    MessageNotFound = 404001,
    RouteNotFound = 404002,
    ReceiptProviderUnknown = 404003,
    CallbackNotFound = 404004,
    MethodNotAllowed = 405001,
    IdempotencyConflict = 409001,
    ClaimLost = 409002,
    NotFailed = 409003,
    CallbackNotDead = 409006,
    JobAlreadyWorking = 409004,
    JobAlreadyStopped = 409005,
    BodyTooLarge = 413001,
    UnsupportedMediaType = 415001,
    BacklogFull = 429001,
    KeyRateLimited = 429002,
    TooManySubscribers = 429003,
    Internal = 500001,
    JobSchedulerUnreachable = 502001,
    DatabaseUnavailable = 503001,
    ReceiptsBusy = 503002,
}

impl ErrorCode {
    /// The HTTP status: the first three digits.
    pub fn status(self) -> StatusCode {
        StatusCode::from_u16((self.code() / 1000) as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Object, serde::Serialize, serde::Deserialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// HTTP status code, repeated in the body.
    pub status: u16,
    /// 6-digit internal code from `configs/errors.toml`.
    pub internal_code: u32,
    /// What went wrong, for a person.
    pub message: String,
}

/// An error on its way to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Which code.
    pub code: ErrorCode,
    /// A message for the client (never a cause chain for 5xx).
    pub message: String,
    /// Seconds the client should wait (`Retry-After`), for a 429.
    pub retry_after_seconds: Option<u64>,
}

impl ApiError {
    /// An error with a specific message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_seconds: None,
        }
    }

    /// The same error telling the client to wait `seconds` (`Retry-After`).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_seconds = Some(seconds);
        self
    }

    /// A 500 whose cause goes to the log, never to the client.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(cause = %cause, "internal error");
        Self::new(ErrorCode::Internal, "An internal error occurred; it has been logged.")
    }

    /// The body this error answers with.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            status: self.code.status().as_u16(),
            internal_code: self.code.code(),
            message: self.message.clone(),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.code(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        self.code.status()
    }

    fn as_response(&self) -> Response {
        let response = poem::web::Json(self.body()).with_status(self.code.status());
        match self.retry_after_seconds {
            Some(seconds) => response.with_header("Retry-After", seconds.to_string()).into_response(),
            None => response.into_response(),
        }
    }
}

/// Turns any error that reaches the edge of a server into the JSON body: our own errors pass
/// through; poem's (unknown route, bad JSON, bad parameter, missing auth, oversize body…) get the
/// matching catalogue code. The route that raised it stays recorded on the response, for the
/// request metrics' route label.
pub fn to_json_error(error: poem::Error) -> Response {
    let pattern = error.data::<poem::PathPattern>().cloned();
    let mut response = json_error(error);
    if let Some(pattern) = pattern {
        response.set_data(pattern);
    }
    response
}

fn json_error(error: poem::Error) -> Response {
    if let Some(api) = error.downcast_ref::<ApiError>() {
        return poem::error::ResponseError::as_response(api);
    }
    let status = error.status();
    let detail = error.to_string();
    let api = match status {
        StatusCode::NOT_FOUND => ApiError::new(ErrorCode::RouteNotFound, "No route matches this path."),
        StatusCode::METHOD_NOT_ALLOWED => {
            ApiError::new(ErrorCode::MethodNotAllowed, "This path does not accept this method.")
        }
        StatusCode::UNAUTHORIZED => ApiError::new(
            ErrorCode::Unauthorized,
            "A valid `Authorization: Bearer <key>` header is required.",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(ErrorCode::BodyTooLarge, "The request body is larger than the limit.")
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(ErrorCode::UnsupportedMediaType, detail),
        StatusCode::BAD_REQUEST => {
            if error.is::<poem_openapi::error::ParseRequestPayloadError>() || error.is::<poem::error::ParseJsonError>()
            {
                ApiError::new(ErrorCode::MalformedBody, detail)
            } else {
                ApiError::new(ErrorCode::InvalidParameter, detail)
            }
        }
        s if s.is_client_error() => ApiError::new(ErrorCode::InvalidParameter, detail),
        _ => ApiError::internal(&detail),
    };
    poem::error::ResponseError::as_response(&api)
}

/// One entry of `configs/errors.toml`.
#[derive(Debug, Deserialize)]
pub struct CatalogueEntry {
    /// The 6-digit code.
    pub code: u32,
    /// A snake_case name.
    pub name: String,
    /// The default message.
    pub message: String,
}

#[derive(Debug, Deserialize)]
struct CatalogueFile {
    error: Vec<CatalogueEntry>,
}

/// Parses a catalogue and checks it: 6-digit codes whose first three digits are an HTTP error
/// status, no code or name listed twice, and every [`ErrorCode`] present.
pub fn check_catalogue(text: &str) -> Result<HashMap<u32, CatalogueEntry>, String> {
    let file: CatalogueFile = toml::from_str(text).map_err(|e| format!("configs/errors.toml: {e}"))?;
    let mut by_code = HashMap::new();
    let mut names = HashSet::new();
    for entry in file.error {
        if !(100_000..=599_999).contains(&entry.code) || entry.code / 1000 < 400 {
            return Err(format!(
                "configs/errors.toml: {} is not a 6-digit error code",
                entry.code
            ));
        }
        if !names.insert(entry.name.clone()) {
            return Err(format!("configs/errors.toml: name {} is listed twice", entry.name));
        }
        let code = entry.code;
        if by_code.insert(code, entry).is_some() {
            return Err(format!("configs/errors.toml: code {code} is listed twice"));
        }
    }
    for code in ErrorCode::ALL {
        if !by_code.contains_key(&code.code()) {
            return Err(format!("configs/errors.toml lacks {} ({code:?})", code.code()));
        }
    }
    Ok(by_code)
}

/// Declares an error response type for one operation that lists exactly the given statuses in
/// the OpenAPI document, so each operation documents only the errors it can really return.
///
/// ```ignore
/// api_errors!(CreateErrors: 400, 401, 409, 503);
/// ```
#[macro_export]
macro_rules! api_errors {
    ($name:ident: $($status:literal),+ $(,)?) => {
        #[doc = concat!("Error responses of one operation: ", $(stringify!($status), " ",)+)]
        #[derive(Debug)]
        pub struct $name(pub $crate::errors::ApiError);

        impl From<$crate::errors::ApiError> for $name {
            fn from(error: $crate::errors::ApiError) -> Self {
                Self(error)
            }
        }

        impl From<$name> for ::poem::Error {
            fn from(error: $name) -> Self {
                ::poem::Error::from(error.0)
            }
        }

        impl ::poem_openapi::ApiResponse for $name {
            fn meta() -> ::poem_openapi::registry::MetaResponses {
                ::poem_openapi::registry::MetaResponses {
                    responses: $crate::errors::with_forbidden(vec![$($status,)+]),
                }
            }

            fn register(registry: &mut ::poem_openapi::registry::Registry) {
                <$crate::errors::ErrorBody as ::poem_openapi::types::Type>::register(registry);
            }
        }
    };
}

/// The documented error responses of an operation: an operation that takes a key (401) can also
/// refuse one without the scope (403).
pub fn with_forbidden(mut statuses: Vec<u16>) -> Vec<poem_openapi::registry::MetaResponse> {
    if statuses.contains(&401) && !statuses.contains(&403) {
        let at = statuses.iter().position(|s| *s > 401).unwrap_or(statuses.len());
        statuses.insert(at, 403);
    }
    statuses.into_iter().map(error_response_meta).collect()
}

/// The OpenAPI description of one error status, with the [`ErrorBody`] schema.
pub fn error_response_meta(status: u16) -> poem_openapi::registry::MetaResponse {
    use poem_openapi::types::Type;
    let description = match status {
        400 => "Invalid input; `internalCode` says which rule was broken.",
        401 => "Missing or unknown bearer key.",
        403 => "The key lacks the scope this operation needs (`x-herald-scope`).",
        404 => "Not found.",
        409 => "Conflicts with the current state.",
        413 => "Body too large.",
        415 => "The body is not JSON (`Content-Type: application/json`).",
        429 => "Admission control refused it — the backlog is over `messenger_api.max_due_backlog` (429001) or the key is over its create rate (429002): nothing was stored; or the key holds `events.max_subscribers_per_key` live subscriptions already (429003). Retry after `Retry-After` seconds.",
        500 => "Internal error; the cause is logged with the request's correlation id.",
        502 => "The other service could not be reached.",
        503 => "MongoDB is unavailable; nothing was changed.",
        _ => "Error.",
    };
    poem_openapi::registry::MetaResponse {
        description,
        status: Some(status),
        status_range: None,
        content: vec![poem_openapi::registry::MetaMediaType {
            content_type: "application/json; charset=utf-8",
            schema: ErrorBody::schema_ref(),
        }],
        headers: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_catalogue_lists_every_code_once() {
        let catalogue = check_catalogue(CATALOGUE).unwrap();
        for code in ErrorCode::ALL {
            assert_eq!(catalogue[&code.code()].code / 1000, u32::from(code.status().as_u16()));
        }
    }

    #[test]
    fn a_code_listed_twice_is_rejected() {
        let twice = format!("{CATALOGUE}\n[[error]]\ncode = 400001\nname = \"again\"\nmessage = \"x\"\n");
        assert!(check_catalogue(&twice).unwrap_err().contains("400001 is listed twice"));
    }

    #[test]
    fn a_used_code_missing_from_the_catalogue_is_rejected() {
        let without: String = CATALOGUE.replace("code = 503001", "code = 503999");
        assert!(check_catalogue(&without).unwrap_err().contains("lacks 503001"));
    }

    #[test]
    fn the_body_repeats_the_status_and_the_code() {
        let body = ApiError::new(ErrorCode::ClaimLost, "gone").body();
        assert_eq!(
            body,
            ErrorBody {
                status: 409,
                internal_code: 409002,
                message: "gone".into()
            }
        );
    }
}
