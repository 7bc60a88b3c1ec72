//! Serving: binding, the middleware every server wears, HTTP metrics and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use poem::listener::{Acceptor, Listener, TcpAcceptor, TcpListener};
use poem::{Endpoint, EndpointExt, IntoResponse, Middleware, PathPattern, Request, Response, Server};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

use crate::errors::to_json_error;

/// A bound listener and the address it really got (port 0 resolves here).
pub struct Bound {
    /// The accepting socket.
    pub acceptor: TcpAcceptor,
    /// The real local address.
    pub addr: SocketAddr,
    /// A connection with no byte read or written for this long is closed ([`IdleCut`]);
    /// `None` keeps idle connections.
    pub idle_timeout: Option<Duration>,
}

impl Bound {
    /// Closes connections with no byte read or written for `timeout` ([`IdleCut`]).
    pub fn idle_timeout(self, timeout: Duration) -> Self {
        Self {
            idle_timeout: Some(timeout),
            ..self
        }
    }
}

/// Binds `host:port`; port 0 picks any free port.
pub async fn bind(host: &str, port: u16) -> anyhow::Result<Bound> {
    let acceptor = TcpListener::bind(format!("{host}:{port}"))
        .into_acceptor()
        .await
        .with_context(|| format!("Failed to bind {host}:{port}"))?;
    let addr = acceptor
        .local_addr()
        .first()
        .and_then(|a| a.as_socket_addr().copied())
        .context("Failed to read the bound address")?;
    Ok(Bound {
        acceptor,
        addr,
        idle_timeout: None,
    })
}

/// Wraps a route tree with what every server needs, outermost last: JSON errors for everything
/// (unknown routes, bad JSON, auth), the `Allow` header on a 405, a body-size limit, HTTP metrics
/// and the correlation id.
pub fn edge<E>(
    routes: E,
    max_body_bytes: usize,
    metrics: HttpMetrics,
    allowed: AllowedMethods,
) -> impl Endpoint<Output = Response>
where
    E: Endpoint + 'static,
{
    routes
        .with(BodyLimit(max_body_bytes))
        .catch_all_error(|error| async move { to_json_error(error) })
        .map(|response: Response| async move { with_security_headers(response) })
        .with(allowed)
        .with(metrics)
        .with(telemetry::CorrelationId)
}

/// What every answer says about itself, unless its route said more (the console and Swagger UI
/// set their own Content-Security-Policy): not to be sniffed, framed or cached as a referrer.
fn with_security_headers(mut response: Response) -> Response {
    use poem::http::header::{
        HeaderValue, CONTENT_SECURITY_POLICY, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (X_FRAME_OPTIONS, "DENY"),
        (REFERRER_POLICY, "no-referrer"),
        (CONTENT_SECURITY_POLICY, "default-src 'none'; frame-ancestors 'none'"),
    ] {
        headers.entry(name).or_insert(HeaderValue::from_static(value));
    }
    response
}

/// The methods each path accepts, read from the server's own OpenAPI document, so a `405`
/// carries the `Allow` header RFC 9110 §15.5.6 requires.
#[derive(Debug, Clone, Default)]
pub struct AllowedMethods(Arc<Vec<(Vec<Option<String>>, String)>>);

impl AllowedMethods {
    /// From an OpenAPI document (`{id}` path parameters match any one segment).
    pub fn from_openapi(spec: &str) -> Self {
        const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
        let doc: serde_json::Value = serde_json::from_str(spec).unwrap_or_default();
        let mut table = Vec::new();
        for (path, operations) in doc["paths"].as_object().into_iter().flatten() {
            let mut methods: Vec<String> = operations
                .as_object()
                .into_iter()
                .flat_map(|ops| ops.keys())
                .filter(|m| METHODS.contains(&m.as_str()))
                .map(|m| m.to_uppercase())
                .collect();
            methods.sort();
            let segments: Vec<Option<String>> = path
                .split('/')
                .map(|s| (!(s.starts_with('{') && s.ends_with('}'))).then(|| s.to_owned()))
                .collect();
            table.push((segments, methods.join(", ")));
        }
        // Literal paths win over templates (`/messages/sent` over `/messages/{id}`).
        table.sort_by_key(|(segments, _)| segments.iter().filter(|s| s.is_none()).count());
        Self(Arc::new(table))
    }

    /// The `Allow` value for a request path, if a documented path matches it.
    pub fn for_path(&self, path: &str) -> Option<&str> {
        let wanted: Vec<&str> = path.split('/').collect();
        self.0.iter().find_map(|(segments, methods)| {
            let matches = segments.len() == wanted.len()
                && segments
                    .iter()
                    .zip(&wanted)
                    .all(|(segment, part)| segment.as_deref().is_none_or(|literal| literal == *part));
            matches.then_some(methods.as_str())
        })
    }
}

impl<E: Endpoint<Output = Response>> Middleware<E> for AllowedMethods {
    type Output = AllowEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        AllowEndpoint {
            inner,
            allowed: self.clone(),
        }
    }
}

/// Adds `Allow` to the 405s of the wrapped endpoint.
pub struct AllowEndpoint<E> {
    inner: E,
    allowed: AllowedMethods,
}

impl<E: Endpoint<Output = Response>> Endpoint for AllowEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        // A `Uri` clone shares its bytes: nothing is copied on the way of every request.
        let uri = req.uri().clone();
        let mut response = self.inner.call(req).await?;
        if response.status() == poem::http::StatusCode::METHOD_NOT_ALLOWED {
            let value = self.allowed.for_path(uri.path()).and_then(|m| m.parse().ok());
            if let Some(value) = value {
                response.headers_mut().insert(poem::http::header::ALLOW, value);
            }
        }
        Ok(response)
    }
}

/// Rejects bodies over the limit with 413: at once by `Content-Length`, or while reading a body
/// sent without one (chunked). Unlike poem's `SizeLimit`, requests without a body pass.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

impl<E: Endpoint> Middleware<E> for BodyLimit {
    type Output = BodyLimitEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        BodyLimitEndpoint { inner, max: self.0 }
    }
}

/// The endpoint produced by [`BodyLimit`].
pub struct BodyLimitEndpoint<E> {
    inner: E,
    max: usize,
}

impl<E: Endpoint> Endpoint for BodyLimitEndpoint<E> {
    type Output = E::Output;

    async fn call(&self, mut req: Request) -> poem::Result<Self::Output> {
        let too_large = || {
            crate::errors::ApiError::new(
                crate::errors::ErrorCode::BodyTooLarge,
                format!("The request body is larger than {} bytes.", self.max),
            )
        };
        let declared = req
            .headers()
            .get(poem::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        match declared {
            Some(length) if length > self.max => return Err(too_large().into()),
            Some(_) => {}
            None if req.headers().contains_key(poem::http::header::TRANSFER_ENCODING) => {
                let body = req
                    .take_body()
                    .into_bytes_limit(self.max)
                    .await
                    .map_err(|_| too_large())?;
                req.set_body(body);
            }
            None => {}
        }
        self.inner.call(req).await
    }
}

/// Serves until `shutdown` completes, then lets in-flight requests finish (bounded by `grace`).
pub async fn serve<E, S>(bound: Bound, app: E, shutdown: S, grace: Duration) -> std::io::Result<()>
where
    E: Endpoint + 'static,
    S: Future<Output = ()> + Send,
{
    match bound.idle_timeout {
        Some(timeout) => {
            Server::new_with_acceptor(IdleCutAcceptor {
                inner: bound.acceptor,
                timeout,
            })
            .run_with_graceful_shutdown(app, shutdown, Some(grace))
            .await
        }
        None => {
            Server::new_with_acceptor(bound.acceptor)
                .run_with_graceful_shutdown(app, shutdown, Some(grace))
                .await
        }
    }
}

/// Accepts connections wrapped in [`IdleCut`].
struct IdleCutAcceptor {
    inner: TcpAcceptor,
    timeout: Duration,
}

impl Acceptor for IdleCutAcceptor {
    type Io = IdleCut<<TcpAcceptor as Acceptor>::Io>;

    fn local_addr(&self) -> Vec<poem::web::LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(
        &mut self,
    ) -> std::io::Result<(
        Self::Io,
        poem::web::LocalAddr,
        poem::web::RemoteAddr,
        poem::http::uri::Scheme,
    )> {
        let (io, local, remote, scheme) = self.inner.accept().await?;
        let idle = IdleCut {
            inner: io,
            timeout: self.timeout,
            last_active: tokio::time::Instant::now(),
            deadline: Box::pin(tokio::time::sleep(self.timeout)),
        };
        Ok((idle, local, remote, scheme))
    }
}

/// A connection that fails its pending read once no byte was read or written for `timeout`,
/// so the server drops it: a client that connects and sends nothing, or stops halfway through
/// its request head, no longer holds a connection (and a task) for ever. poem's own
/// `idle_timeout` asks the connection to shut down gracefully, which does not end one whose
/// protocol or request head is still being read (measured: 20 such sockets still open after
/// 10 s). Live feeds write a heartbeat or ping well within the timeout, so they stay open;
/// start-up requires the timeout to exceed the longest a handler may run silently.
///
/// Reads and writes only note the time; the timer is moved when it fires and the connection
/// was active meanwhile, so the hot path never touches the timer wheel.
pub struct IdleCut<T> {
    inner: T,
    timeout: Duration,
    last_active: tokio::time::Instant,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<T> IdleCut<T> {
    fn active(&mut self) {
        self.last_active = tokio::time::Instant::now();
    }

    /// Ready once the connection has been idle for the whole timeout; otherwise the timer is
    /// set to the end of the current quiet spell and registered with `cx`.
    fn poll_idle(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        loop {
            std::task::ready!(self.deadline.as_mut().poll(cx));
            let due = self.last_active + self.timeout;
            if due <= tokio::time::Instant::now() {
                return std::task::Poll::Ready(());
            }
            self.deadline.as_mut().reset(due);
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleCut<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.active();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => match self.poll_idle(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection idle past the timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleCut<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(written, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Request counters and latency by route and status.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl HttpMetrics {
    /// Registers the HTTP metrics in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route, method and status."),
            &["route", "method", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency by route."),
            &["route", "method"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Self { requests, latency })
    }
}

/// The label of requests that matched no route. Every request is labelled by the route
/// pattern it matched (`/api/messenger/messages/{id}`), never by its raw path, so junk URLs
/// cannot grow the label set.
pub const UNMATCHED: &str = "unmatched";

/// The route label of a response: the pattern of the route that answered it (poem records it
/// on the response, also on errors), or [`UNMATCHED`]. Path parameters read `{id}`, as in
/// the OpenAPI documents (every path parameter of Herald's routes is a message id; poem-openapi
/// records them by position, `:param0`).
pub fn route_label(response: &Response) -> String {
    // A request that only reached a nest mounted at the root (no route of it matched) carries
    // the nest's empty pattern.
    let Some(pattern) = response.data::<PathPattern>().filter(|p| !matches!(&*p.0, "" | "/")) else {
        return UNMATCHED.to_owned();
    };
    pattern
        .0
        .split('/')
        .map(|segment| if segment.starts_with(':') { "{id}" } else { segment })
        .collect::<Vec<_>>()
        .join("/")
}

impl<E: Endpoint> Middleware<E> for HttpMetrics {
    type Output = HttpMetricsEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        HttpMetricsEndpoint {
            inner,
            metrics: self.clone(),
        }
    }
}

/// The endpoint produced by [`HttpMetrics`].
pub struct HttpMetricsEndpoint<E> {
    inner: E,
    metrics: HttpMetrics,
}

impl<E: Endpoint> Endpoint for HttpMetricsEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let method = req.method().to_string();
        let started = Instant::now();
        let response = match self.inner.call(req).await {
            Ok(output) => output.into_response(),
            Err(error) => error.into_response(),
        };
        let status = response.status().as_u16();
        let route = route_label(&response);
        self.metrics
            .requests
            .with_label_values(&[route.as_str(), method.as_str(), &status.to_string()])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[route.as_str(), method.as_str()])
            .observe(started.elapsed().as_secs_f64());
        Ok(response)
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render_metrics(registry: &Registry) -> Response {
    match TextEncoder::new().encode_to_string(&registry.gather()) {
        Ok(text) => Response::builder().content_type("text/plain; version=0.0.4").body(text),
        Err(error) => crate::errors::ApiError::internal(&error).as_response_owned(),
    }
}

impl crate::errors::ApiError {
    /// This error as a response.
    pub fn as_response_owned(&self) -> Response {
        poem::error::ResponseError::as_response(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_405_names_the_methods_the_documented_path_accepts() {
        use poem::test::TestClient;
        use poem::{get, handler, post, Route};

        #[handler]
        fn ok() -> &'static str {
            "ok"
        }
        let spec = r#"{"paths": {
            "/api/messages": {"get": {}, "post": {}, "parameters": []},
            "/api/messages/{id}": {"get": {}},
            "/api/messages/sent": {"get": {}}
        }}"#;
        let allowed = AllowedMethods::from_openapi(spec);
        assert_eq!(allowed.for_path("/api/messages/sent"), Some("GET"));
        assert_eq!(allowed.for_path("/api/messages/abc"), Some("GET"));
        assert_eq!(allowed.for_path("/api/messages"), Some("GET, POST"));
        assert_eq!(allowed.for_path("/api/messages/abc/x"), None);

        let app = Route::new()
            .at("/api/messages", get(ok).post(ok))
            .at("/api/messages/:id", get(ok))
            .at("/other", post(ok))
            .catch_all_error(|error| async move { to_json_error(error) })
            .with(allowed);
        let client = TestClient::new(app);
        let response = client.delete("/api/messages/abc").send().await;
        response.assert_status(poem::http::StatusCode::METHOD_NOT_ALLOWED);
        response.assert_header("allow", "GET");
        let response = client.put("/api/messages").send().await;
        response.assert_header("allow", "GET, POST");
        // A path the document does not describe gets its 405 without a guess.
        let response = client.get("/other").send().await;
        response.assert_status(poem::http::StatusCode::METHOD_NOT_ALLOWED);
        response.assert_header_is_not_exist("allow");
        client.get("/api/messages/abc").send().await.assert_status_is_ok();
    }

    #[tokio::test]
    async fn route_labels_are_route_patterns_and_one_label_for_the_unmatched() {
        use poem::test::TestClient;
        use poem::{get, handler, EndpointExt, Route};

        #[handler]
        fn one() -> &'static str {
            "one"
        }
        let registry = Registry::new();
        let metrics = HttpMetrics::new(&registry).unwrap();
        let app = Route::new()
            .at("/health", get(one))
            .nest("/", Route::new().at("/api/messages/:id", get(one)))
            .with(metrics);
        let client = TestClient::new(app);
        for path in [
            "/api/messages/0123456789abcdef01234567",
            "/api/messages/not-an-id",
            "/health",
        ] {
            client.get(path).send().await.assert_status_is_ok();
        }
        client
            .post("/health")
            .send()
            .await
            .assert_status(poem::http::StatusCode::METHOD_NOT_ALLOWED);
        for junk in ["/junk/1", "/junk/2", "/api/messages/x/y", "/%2e%2e/etc"] {
            client
                .get(junk)
                .send()
                .await
                .assert_status(poem::http::StatusCode::NOT_FOUND);
        }
        let mut labels: Vec<String> = registry
            .gather()
            .iter()
            .filter(|family| family.name() == "http_requests_total")
            .flat_map(|family| family.get_metric().iter())
            .map(|m| {
                m.get_label()
                    .iter()
                    .map(|l| format!("{}={}", l.name(), l.value()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        labels.sort();
        assert_eq!(
            labels,
            [
                "method=GET,route=/api/messages/{id},status=200",
                "method=GET,route=/health,status=200",
                "method=GET,route=unmatched,status=404",
                "method=POST,route=/health,status=405",
            ]
        );
    }
}
