//! Delivery receipts (SPEC §17): how a provider proves a receipt is its own, where its fields
//! are, and what its words mean in Herald's delivery states.
//!
//! A provider's `[providers.receipts]` names its scheme:
//! - `hmac-sha256`: the header `signature_header` holds the HMAC-SHA256 of the raw body with
//!   `secret`, in hex, optionally prefixed `sha256=`;
//! - `twilio`: `X-Twilio-Signature` holds base64(HMAC-SHA1(auth token, the full URL the
//!   provider posted to, then every form parameter's name and value sorted by name)) — Twilio's
//!   documented scheme; the URL is `public_url` when set (behind a proxy the URL Herald sees is
//!   not the one Twilio signed), else the request's own;
//! - `basic`: `Authorization: Basic` with `user` and `secret`.
//!
//! Every comparison is constant-time.

use std::collections::BTreeMap;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use layered_config::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};
use subtle::ConstantTimeEq;

/// Herald's delivery states, ranked: a receipt applies only over a lower rank, so a final state
/// is never overwritten by an intermediate one, `read` outranks `delivered`, the first of two
/// different finals stands, and a replay changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, poem_openapi::Enum)]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
pub enum DeliveryState {
    /// On its way (an intermediate report: queued, sent to the operator).
    Sent,
    /// No final receipt came within `receipts.timeout_hours`.
    Unknown,
    /// It reached the handset.
    Delivered,
    /// The network could not deliver it.
    Undelivered,
    /// The provider failed it.
    Failed,
    /// The recipient read it.
    Read,
}

impl DeliveryState {
    /// Its rank (see the type's documentation).
    pub const fn rank(self) -> i32 {
        match self {
            Self::Sent => 1,
            Self::Unknown => 2,
            Self::Delivered | Self::Undelivered | Self::Failed => 3,
            Self::Read => 4,
        }
    }

    /// Its name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Unknown => "unknown",
            Self::Delivered => "delivered",
            Self::Undelivered => "undelivered",
            Self::Failed => "failed",
            Self::Read => "read",
        }
    }

    /// The state named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Sent,
            Self::Unknown,
            Self::Delivered,
            Self::Undelivered,
            Self::Failed,
            Self::Read,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }
}

/// How a provider signs its receipts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum ReceiptScheme {
    /// HMAC-SHA256 of the raw body in a header.
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    /// Twilio's `X-Twilio-Signature`.
    #[serde(rename = "twilio")]
    Twilio,
    /// HTTP basic authentication.
    #[serde(rename = "basic")]
    Basic,
}

fn redact<S: Serializer>(_: &SecretString, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str("<redacted>")
}

/// `[providers.receipts]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptSettings {
    /// `hmac-sha256`, `twilio` or `basic`.
    pub scheme: ReceiptScheme,
    /// The HMAC secret, Twilio auth token or basic password.
    #[serde(serialize_with = "redact")]
    pub secret: SecretString,
    /// For `hmac-sha256`: the header holding the signature.
    #[serde(default = "default_signature_header")]
    pub signature_header: String,
    /// For `basic`: the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// For `twilio`: the URL the provider posts to, as it signs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Where the provider's message id is: a JSON pointer (`/messageId`) or a form field.
    pub message_id_field: String,
    /// Where its status word is.
    pub status_field: String,
    /// Where its error code is, if it sends one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code_field: Option<String>,
    /// Its status words and the state each means; a word not listed is kept as
    /// `providerStatus` and counts as `sent` (intermediate).
    #[serde(default)]
    pub status_map: BTreeMap<String, DeliveryState>,
    /// Hours after a send without a final receipt before its delivery becomes `unknown`, for
    /// this provider (default `receipts.timeout_hours`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_hours: Option<f64>,
}

fn default_signature_header() -> String {
    "X-Herald-Signature".to_owned()
}

impl ReceiptSettings {
    /// What is wrong with these settings of provider `name`, if anything.
    pub fn problem(&self, name: &str) -> Option<String> {
        let problem = if self.secret.expose_secret().trim().is_empty() {
            "secret must not be empty"
        } else if self.scheme == ReceiptScheme::Basic && self.user.as_deref().is_none_or(str::is_empty) {
            "scheme basic needs user"
        } else if self.message_id_field.trim().is_empty() || self.status_field.trim().is_empty() {
            "message_id_field and status_field must name a field"
        } else if poem::http::HeaderName::from_bytes(self.signature_header.as_bytes()).is_err() {
            "signature_header is not a header name"
        } else if self.timeout_hours.is_some_and(|h| !(0.0001..=8760.0).contains(&h)) {
            "timeout_hours must be more than 0 up to 8760"
        } else {
            return None;
        };
        Some(format!("providers {name:?} receipts: {problem}"))
    }

    /// The state a provider word means.
    pub fn state_of(&self, word: &str) -> DeliveryState {
        self.status_map
            .get(word)
            .or_else(|| self.status_map.get(&word.to_ascii_lowercase()))
            .copied()
            .unwrap_or(DeliveryState::Sent)
    }
}

/// What a receipt request brings for its signature to be checked.
pub struct Signed<'a> {
    /// A header's value.
    pub header: &'a (dyn Fn(&str) -> Option<String> + Sync),
    /// The raw body.
    pub body: &'a [u8],
    /// The URL the request reached, as the provider would have written it.
    pub url: &'a str,
    /// The form parameters, when the body is a form.
    pub form: &'a [(String, String)],
}

/// Whether the receipt is the provider's own.
pub fn verify(settings: &ReceiptSettings, signed: &Signed<'_>) -> bool {
    let secret = settings.secret.expose_secret().as_bytes();
    match settings.scheme {
        ReceiptScheme::HmacSha256 => {
            let Some(given) = (signed.header)(&settings.signature_header) else {
                return false;
            };
            let given = given.trim();
            let given = given.strip_prefix("sha256=").unwrap_or(given);
            let Ok(given) = hex::decode(given) else {
                return false;
            };
            let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret) else {
                return false;
            };
            mac.update(signed.body);
            mac.verify_slice(&given).is_ok()
        }
        ReceiptScheme::Twilio => {
            let Some(given) = (signed.header)("X-Twilio-Signature") else {
                return false;
            };
            let url = settings.public_url.as_deref().unwrap_or(signed.url);
            let expected = twilio_signature(secret, url, signed.form);
            bool::from(expected.as_bytes().ct_eq(given.trim().as_bytes()))
        }
        ReceiptScheme::Basic => {
            let Some(given) = (signed.header)("Authorization") else {
                return false;
            };
            let user = settings.user.as_deref().unwrap_or_default();
            let expected = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", settings.secret.expose_secret()))
            );
            bool::from(expected.as_bytes().ct_eq(given.trim().as_bytes()))
        }
    }
}

/// Twilio's signature: base64(HMAC-SHA1(token, url + each parameter's name and value, sorted by
/// name)).
pub fn twilio_signature(token: &[u8], url: &str, form: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = form.iter().collect();
    sorted.sort();
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(token) else {
        return String::new();
    };
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The hex HMAC-SHA256 of `body` with `secret` (what an `hmac-sha256` provider sends).
pub fn hmac_sha256_hex(secret: &[u8], body: &[u8]) -> String {
    match Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(body);
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(scheme: ReceiptScheme) -> ReceiptSettings {
        ReceiptSettings {
            scheme,
            secret: "12345".into(),
            signature_header: default_signature_header(),
            user: Some("herald".into()),
            public_url: None,
            message_id_field: "/id".into(),
            status_field: "/status".into(),
            error_code_field: None,
            status_map: BTreeMap::from([("DELIVRD".to_owned(), DeliveryState::Delivered)]),
            timeout_hours: None,
        }
    }

    #[test]
    fn twilios_documented_vector_verifies_and_a_changed_parameter_does_not() {
        // https://www.twilio.com/docs/usage/security#validating-requests
        let form: Vec<(String, String)> = [
            ("To", "+18005551212"),
            ("CallSid", "CA1234567890ABCDE"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("Caller", "+12349013030"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec();
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(twilio_signature(b"12345", url, &form), "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        let header = |name: &str| (name == "X-Twilio-Signature").then(|| "0/KCTR6DLpKmkAf8muzZqo1nDgQ=".to_owned());
        let signed = Signed {
            header: &header,
            body: b"",
            url,
            form: &form,
        };
        assert!(verify(&settings(ReceiptScheme::Twilio), &signed));
        let mut tampered = form.clone();
        tampered[2].1 = "9999".into();
        assert!(!verify(
            &settings(ReceiptScheme::Twilio),
            &Signed {
                form: &tampered,
                ..signed
            }
        ));
    }

    #[test]
    fn hmac_and_basic_receipts_verify_only_with_the_secret() {
        let body = br#"{"id":"m-1","status":"DELIVRD"}"#;
        let good = hmac_sha256_hex(b"12345", body);
        for value in [good.clone(), format!("sha256={good}")] {
            let header = move |name: &str| (name == "X-Herald-Signature").then(|| value.clone());
            let signed = Signed {
                header: &header,
                body,
                url: "",
                form: &[],
            };
            assert!(verify(&settings(ReceiptScheme::HmacSha256), &signed));
        }
        let wrong = hmac_sha256_hex(b"other", body);
        let header = move |_: &str| Some(wrong.clone());
        let signed = Signed {
            header: &header,
            body,
            url: "",
            form: &[],
        };
        assert!(!verify(&settings(ReceiptScheme::HmacSha256), &signed));
        let basic = |_: &str| Some("Basic aGVyYWxkOjEyMzQ1".to_owned()); // herald:12345
        assert!(verify(
            &settings(ReceiptScheme::Basic),
            &Signed {
                header: &basic,
                body,
                url: "",
                form: &[]
            }
        ));
        let none = |_: &str| None;
        assert!(!verify(
            &settings(ReceiptScheme::Basic),
            &Signed {
                header: &none,
                body,
                url: "",
                form: &[]
            }
        ));
    }

    #[test]
    fn ranks_keep_finals_over_intermediates_and_read_over_delivered() {
        use DeliveryState::*;
        assert!(Sent.rank() < Unknown.rank() && Unknown.rank() < Delivered.rank());
        assert_eq!(Delivered.rank(), Failed.rank());
        assert!(Read.rank() > Delivered.rank());
        let s = settings(ReceiptScheme::Basic);
        assert_eq!(s.state_of("DELIVRD"), Delivered);
        assert_eq!(s.state_of("ENROUTE"), Sent, "an unknown word is intermediate");
    }
}
