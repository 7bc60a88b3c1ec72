//! Each service's OpenAPI document and Swagger UI as clients see them: the per-scope security
//! schemes folded into one `BearerAuth` with `x-herald-scope` on every operation
//! ([`crate::auth::scoped_spec`]), the input rules the handlers enforce declared on the
//! parameters and fields they apply to ([`Rules`]), and the UI page served with security headers
//! like the console.
//!
//! The rules are declared, not enforced by poem-openapi: the handlers check them and answer with
//! Herald's own codes (400009 for a page, 400006 for an id, 400003 for a phone, 400004/400005 for
//! content), which a validator in front would replace with a generic one.

use poem::endpoint::make_sync;
use poem::web::Html;
use poem::{Endpoint, IntoResponse, Response, Route};
use poem_openapi::{OpenApi, OpenApiService, Webhook};

use serde_json::{json, Value};

use crate::auth::scoped_spec;
use crate::pagination::MAX_LIMIT;

/// An id as the API takes it: a MongoDB ObjectId in hex.
pub const ID_PATTERN: &str = "^[0-9a-fA-F]{24}$";
/// A phone number as the API takes it: E.164, `+` then 8 to 15 digits.
pub const PHONE_PATTERN: &str = "^\\+[0-9]{8,15}$";

/// The input rules the handlers enforce that depend on the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// `message.max_chars`: the longest content.
    pub max_chars: usize,
}

impl Rules {
    /// The rules `settings` set.
    pub fn of(settings: &crate::settings::Settings) -> Self {
        Self {
            max_chars: settings.message.max_chars,
        }
    }
}

/// Writes `rules` and the fixed rules (page size, ids, phone numbers) into `spec`.
pub fn declare_rules(spec: &str, rules: Rules) -> String {
    let Ok(mut doc) = serde_json::from_str::<Value>(spec) else {
        return spec.to_owned();
    };
    let operations = doc["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(Value::as_object_mut)
        .flat_map(|operations| operations.values_mut());
    for operation in operations {
        // `get_mut`: indexing a missing key mutably would write a `null` there.
        let parameters = operation
            .get_mut("parameters")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten();
        for parameter in parameters {
            let name = parameter["name"].as_str().unwrap_or_default().to_owned();
            let schema = &mut parameter["schema"];
            match (parameter_place(&name), schema["type"].as_str()) {
                (Some(Place::Limit), Some("integer")) => {
                    schema["minimum"] = json!(1);
                    schema["maximum"] = json!(MAX_LIMIT);
                }
                (Some(Place::Offset), Some("integer")) => schema["minimum"] = json!(0),
                (Some(Place::Id), Some("string")) => schema["pattern"] = json!(ID_PATTERN),
                (Some(Place::Id), Some("array")) if schema["items"]["type"] == "string" => {
                    schema["items"]["pattern"] = json!(ID_PATTERN);
                }
                (Some(Place::Phone), Some("string")) => schema["pattern"] = json!(PHONE_PATTERN),
                _ => {}
            }
        }
    }
    // Only what clients send: an answer shows what was stored, under the rules of its day.
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        let inputs = schemas
            .iter_mut()
            .filter(|(name, _)| INPUT_SCHEMAS.contains(&name.as_str()))
            .map(|(_, schema)| schema);
        for schema in inputs {
            let Some(properties) = schema["properties"].as_object_mut() else {
                continue;
            };
            if let Some(to) = properties.get_mut("to").filter(|p| p["type"] == "string") {
                to["pattern"] = json!(PHONE_PATTERN);
            }
            if let Some(content) = properties.get_mut("content").filter(|p| p["type"] == "string") {
                content["minLength"] = json!(1);
                content["maxLength"] = json!(rules.max_chars);
            }
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| spec.to_owned())
}

/// The request bodies whose `to` and `content` the rules apply to.
const INPUT_SCHEMAS: [&str; 2] = ["NewMessage", "RequeueFilterBody"];

enum Place {
    Limit,
    Offset,
    Id,
    Phone,
}

fn parameter_place(name: &str) -> Option<Place> {
    match name {
        "limit" => Some(Place::Limit),
        "offset" => Some(Place::Offset),
        "id" | "after" => Some(Place::Id),
        "to" => Some(Place::Phone),
        _ => None,
    }
}

/// Swagger UI's page carries its script and style inline; nothing else runs, loads or frames it.
const SWAGGER_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                           img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                           frame-ancestors 'none'";

/// One service's published document and its UI page.
#[derive(Clone)]
pub struct ApiDoc {
    spec: String,
    page: String,
}

impl ApiDoc {
    /// The document of `api`, scoped, and the Swagger UI page showing it.
    pub fn of<T: OpenApi, W: Webhook>(api: &OpenApiService<T, W>, rules: Rules) -> Self {
        let raw = api.spec();
        let spec = declare_rules(&scoped_spec(&raw), rules);
        // poem-openapi writes the document into its page verbatim: show the scoped one.
        let page = api.swagger_ui_html().replacen(&raw, &spec, 1);
        Self { spec, page }
    }

    /// The document as JSON text.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// `GET …/openapi.json`.
    pub fn spec_endpoint(&self) -> impl Endpoint<Output = Response> + 'static {
        let spec = self.spec.clone();
        make_sync(move |_| Response::builder().content_type("application/json").body(spec.clone()))
    }

    /// `GET …/swagger`, nested.
    pub fn swagger_ui(&self) -> impl Endpoint + 'static {
        let page = self.page.clone();
        Route::new().at(
            "/",
            make_sync(move |_| {
                Html(page.clone())
                    .with_header("Content-Security-Policy", SWAGGER_CSP)
                    .into_response()
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_the_handlers_enforce_are_declared_on_inputs_only() {
        let spec = json!({
            "paths": {"/m/{id}": {"get": {"parameters": [
                {"name": "id", "in": "path", "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                {"name": "offset", "in": "query", "schema": {"type": "integer"}},
                {"name": "id", "in": "query", "schema": {"type": "array", "items": {"type": "string"}}},
                {"name": "to", "in": "query", "schema": {"type": "string"}},
                {"name": "status", "in": "query", "schema": {"type": "string"}}
            ]}}},
            "components": {"schemas": {
                "NewMessage": {"properties": {"to": {"type": "string"}, "content": {"type": "string"}}},
                "MessageView": {"properties": {"to": {"type": "string"}, "content": {"type": "string"}}}
            }}
        });
        let out: Value = serde_json::from_str(&declare_rules(&spec.to_string(), Rules { max_chars: 70 })).unwrap();
        let p = &out["paths"]["/m/{id}"]["get"]["parameters"];
        assert_eq!(p[0]["schema"]["pattern"], ID_PATTERN);
        assert_eq!(
            (p[1]["schema"]["minimum"].clone(), p[1]["schema"]["maximum"].clone()),
            (json!(1), json!(100))
        );
        assert_eq!(p[2]["schema"]["minimum"], 0);
        assert_eq!(p[3]["schema"]["items"]["pattern"], ID_PATTERN);
        assert_eq!(p[4]["schema"]["pattern"], PHONE_PATTERN);
        assert!(p[5]["schema"].get("pattern").is_none());
        // An operation without parameters keeps none (not a `null`).
        let bare = json!({"paths": {"/h": {"get": {"responses": {}}}}});
        let bare: Value = serde_json::from_str(&declare_rules(&bare.to_string(), Rules { max_chars: 70 })).unwrap();
        assert!(bare["paths"]["/h"]["get"].get("parameters").is_none(), "{bare}");
        let new = &out["components"]["schemas"]["NewMessage"]["properties"];
        assert_eq!(
            (new["content"]["minLength"].clone(), new["content"]["maxLength"].clone()),
            (json!(1), json!(70))
        );
        assert_eq!(new["to"]["pattern"], PHONE_PATTERN);
        let view = &out["components"]["schemas"]["MessageView"]["properties"];
        assert!(view["content"].get("maxLength").is_none() && view["to"].get("pattern").is_none());
        // The patterns say what the handlers accept.
        let phone = |s: &str| {
            s.starts_with('+') && (8..=15).contains(&(s.len() - 1)) && s[1..].bytes().all(|b| b.is_ascii_digit())
        };
        assert!(phone("+905551112233") && !phone("905551112233") && !phone("+1234567"));
    }
}
