//! Each service's OpenAPI document and Swagger UI as clients see them: the per-scope security
//! schemes folded into one `BearerAuth` with `x-herald-scope` on every operation
//! ([`crate::auth::scoped_spec`]), and the UI page served with security headers like the console.

use poem::endpoint::make_sync;
use poem::web::Html;
use poem::{Endpoint, IntoResponse, Response, Route};
use poem_openapi::{OpenApi, OpenApiService, Webhook};

use crate::auth::scoped_spec;

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
    pub fn of<T: OpenApi, W: Webhook>(api: &OpenApiService<T, W>) -> Self {
        let raw = api.spec();
        let spec = scoped_spec(&raw);
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
