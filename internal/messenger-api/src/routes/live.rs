//! Live status: the event stream (SSE), its WebSocket twin, the stats snapshot and the run
//! history the console shows.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use herald_core::api_errors;
use herald_core::auth::{ApiKeys, BearerAuth};
use herald_core::pagination::PageRequest;
use herald_core::{ApiError, ErrorCode};
use poem::web::sse::Event;
use poem::web::websocket::{Message, WebSocket};
use poem::web::Data;
use poem::{handler, IntoResponse, Request, Response};
use poem_openapi::param::{Header, Query};
use poem_openapi::payload::{EventStream, Json};
use poem_openapi::types::ToJSON;
use poem_openapi::{ApiResponse, OpenApi};
use serde::Deserialize;

use super::views::StatsView;
use super::ApiTags;
use crate::domain::{self, MessageStatus};
use crate::events::{EventFeed, EventFilter, EventType, FeedEvent};
use crate::service::{JobRemote, Monitor};
use herald_core::jobs::RunView;
use herald_core::pagination::Page;

api_errors!(EventsErrors: 400, 401);
api_errors!(StatsErrors: 401, 500, 503);
api_errors!(RunsErrors: 400, 401, 502);

/// The live events.
#[derive(ApiResponse)]
pub enum EventsResponse {
    /// `text/event-stream`: each event's `event:` is its type and its `id:` its position.
    #[oai(status = 200)]
    Ok(EventStream<BoxStream<'static, FeedEvent>>),
}

/// The stats snapshot.
#[derive(ApiResponse)]
pub enum StatsResponse {
    /// Counts, lag, sends per minute, the job.
    #[oai(status = 200)]
    Ok(Json<StatsView>),
}

/// Run history.
#[derive(ApiResponse)]
pub enum RunsResponse {
    /// A page of runs, newest first.
    #[oai(status = 200)]
    Ok(Json<Page<RunView>>),
}

/// Live-status operations.
pub struct LiveApi {
    /// Stats.
    pub monitor: Arc<Monitor>,
    /// Run history, asked of the Job Scheduler.
    pub job: Arc<JobRemote>,
    /// The event feed.
    pub feed: EventFeed,
    /// Interval of the SSE heartbeat comment.
    pub heartbeat: Duration,
}

/// Parses the `status` and `id` filters (400 on a bad value).
pub fn parse_filter(statuses: &[String], ids: &[String]) -> Result<EventFilter, ApiError> {
    let statuses = statuses
        .iter()
        .map(|s| {
            MessageStatus::parse(s).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidStatusFilter,
                    "status must be pending, processing, sent or failed",
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ids = ids
        .iter()
        .map(|id| domain::parse_id(id).map(|oid| oid.to_hex()).map_err(ApiError::from))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(EventFilter { statuses, ids })
}

fn sse_event(event: FeedEvent) -> Event {
    let sse = Event::message(event.to_json_string()).event_type(event.kind.as_str());
    if event.id.is_empty() {
        sse
    } else {
        sse.id(event.id)
    }
}

#[OpenApi(tag = "ApiTags::Live")]
impl LiveApi {
    /// Follow delivery live (Server-Sent Events)
    ///
    /// Every state change of every message and of the sending job, within moments, from any
    /// replica. Narrow with `status` (repeatable) and `id` (follow one message). Reconnect with
    /// `Last-Event-ID` to receive every event missed, none twice; a `reset` event means that
    /// position is gone (re-read a snapshot). A comment line is sent every 15 s. A subscriber
    /// that falls far behind gets a final `dropped` event and the stream ends (resume from the
    /// last id). Browsers may instead use the WebSocket at `/api/messenger/ws`, which takes the
    /// key in its first frame.
    #[oai(path = "/api/messenger/events", method = "get", operation_id = "followEvents")]
    async fn events(
        &self,
        _auth: BearerAuth,
        /// Only message events of these statuses (repeatable): pending, processing, sent, failed.
        status: Query<Vec<String>>,
        /// Only events of these message ids (repeatable).
        id: Query<Vec<String>>,
        /// Resume after this event id.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Result<EventsResponse, EventsErrors> {
        let filter = Arc::new(RwLock::new(parse_filter(&status.0, &id.0)?));
        let subscription = self.feed.subscribe(last_event_id.0.as_deref(), filter).await;
        Ok(EventsResponse::Ok(
            EventStream::new(subscription.boxed())
                .keep_alive(self.heartbeat)
                .to_event(sse_event),
        ))
    }

    /// Delivery stats
    ///
    /// Counts by status, how long the oldest due message has waited, messages sent in each of
    /// the last 60 minutes (oldest first) and the sending job's state.
    #[oai(path = "/api/messenger/stats", method = "get", operation_id = "getStats")]
    async fn stats(&self, _auth: BearerAuth) -> Result<StatsResponse, StatsErrors> {
        let stats = self.monitor.stats().await.map_err(ApiError::from)?;
        Ok(StatsResponse::Ok(Json(stats.into())))
    }

    /// The scheduler's run history
    ///
    /// Runs of every scheduler replica, newest first, as the Job Scheduler reports them
    /// (502 when it cannot be reached). Same pagination as its `/job-scheduler/jobs`.
    #[oai(path = "/api/messenger/job/runs", method = "get", operation_id = "listJobRuns")]
    async fn runs(
        &self,
        req: &poem::Request,
        _auth: BearerAuth,
        /// Page size, 1..=100 (default 20).
        limit: Query<Option<i64>>,
        /// Runs to skip (not with `after`).
        offset: Query<Option<i64>>,
        /// Continue after this run id (a `nextCursor`).
        after: Query<Option<String>>,
    ) -> Result<RunsResponse, RunsErrors> {
        let page = PageRequest::parse(limit.0, offset.0, after.0.as_deref())?;
        let runs = self
            .job
            .runs(page, super::correlation(req).as_deref())
            .await
            .map_err(ApiError::from)?;
        Ok(RunsResponse::Ok(Json(runs)))
    }
}

/// What the WebSocket's timing needs.
#[derive(Debug, Clone, Copy)]
pub struct SocketTiming {
    /// Ping interval; two pings without a pong close the socket.
    pub ping: Duration,
    /// How long the client has to authenticate.
    pub auth: Duration,
}

/// A frame from the client.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientFrame {
    auth: Option<String>,
    last_event_id: Option<String>,
    subscribe: Option<SubscribeFrame>,
}

#[derive(Debug, Deserialize)]
struct SubscribeFrame {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    status: Vec<String>,
}

fn control(kind: &str, detail: serde_json::Value) -> Message {
    let mut body = serde_json::json!({"type": kind});
    if let (Some(body), Some(detail)) = (body.as_object_mut(), detail.as_object()) {
        body.extend(detail.clone());
    }
    Message::Text(body.to_string())
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(poem::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// `GET /api/messenger/ws`: the event feed over a WebSocket.
///
/// Authenticate with `Authorization: Bearer <key>` on the upgrade, or (browsers) with a first
/// text frame `{"auth": "<key>", "lastEventId"?: "<id>"}`. Narrow with
/// `{"subscribe": {"ids": [...], "status": [...]}}` at any time. Events arrive as text frames
/// (the same JSON as the SSE `data:`); the server pings every `events.ws_ping_seconds` and
/// closes a client that misses two pongs.
#[handler]
pub async fn websocket(
    req: &Request,
    ws: WebSocket,
    feed: Data<&EventFeed>,
    keys: Data<&ApiKeys>,
    timing: Data<&SocketTiming>,
) -> Response {
    let header_auth = match bearer(req) {
        Some(key) if keys.accepts(key) => true,
        Some(_) => {
            return ApiError::new(ErrorCode::Unauthorized, "The bearer key is not accepted.").as_response_owned();
        }
        None => false,
    };
    let feed = feed.0.clone();
    let keys = keys.0.clone();
    let timing = *timing.0;
    ws.on_upgrade(move |socket| serve_socket(socket, feed, keys, timing, header_auth))
        .into_response()
}

async fn serve_socket(
    socket: poem::web::websocket::WebSocketStream,
    feed: EventFeed,
    keys: ApiKeys,
    timing: SocketTiming,
    header_auth: bool,
) {
    let (mut sink, mut incoming) = socket.split();
    let send_timeout = timing.ping;
    // Authenticate: the upgrade's header, or the first frame.
    let mut resume = None;
    if !header_auth {
        let first = tokio::time::timeout(timing.auth, incoming.next()).await;
        let frame = match first {
            Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<ClientFrame>(&text).ok(),
            _ => None,
        };
        match frame {
            Some(ClientFrame {
                auth: Some(key),
                last_event_id,
                ..
            }) if keys.accepts(&key) => resume = last_event_id,
            _ => {
                let _ = sink
                    .send(Message::Close(Some((
                        poem::web::websocket::CloseCode::Policy,
                        "send {\"auth\": \"<key>\"} first with an accepted key".into(),
                    ))))
                    .await;
                return;
            }
        }
    }
    let filter = Arc::new(RwLock::new(EventFilter::default()));
    let mut events = feed.subscribe(resume.as_deref(), filter.clone()).await;
    let metrics = feed.metrics().clone();
    if sink.send(control("ready", serde_json::json!({}))).await.is_err() {
        return;
    }
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + timing.ping, timing.ping);
    let mut unanswered = 0u32;
    let closing = feed.closing();
    let reason = loop {
        let outgoing = tokio::select! {
            event = events.next() => match event {
                Some(event) => {
                    let last = event.kind == EventType::Dropped;
                    let frame = Message::Text(event.to_json_string());
                    if last {
                        let _ = tokio::time::timeout(send_timeout, sink.send(frame)).await;
                        break None;
                    }
                    frame
                }
                None => break Some((poem::web::websocket::CloseCode::Away, "server shutting down")),
            },
            frame = incoming.next() => match frame {
                Some(Ok(Message::Pong(_))) => { unanswered = 0; continue }
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientFrame>(&text) {
                    Ok(ClientFrame { subscribe: Some(sub), .. }) => {
                        match parse_filter(&sub.status, &sub.ids) {
                            Ok(narrower) => {
                                let ids = narrower.ids.clone();
                                if let Ok(mut current) = filter.write() {
                                    *current = narrower;
                                }
                                control("subscribed", serde_json::json!({"ids": ids, "status": sub.status}))
                            }
                            Err(error) => control("error", serde_json::json!({"internalCode": error.code.code(), "message": error.message})),
                        }
                    }
                    _ => control("error", serde_json::json!({"message": "expected {\"subscribe\": {\"ids\": [...], \"status\": [...]}}"})),
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                Some(Ok(_)) => continue,
            },
            _ = ping.tick() => {
                if unanswered >= 2 {
                    metrics.dropped.with_label_values(&["ping_timeout"]).inc();
                    break Some((poem::web::websocket::CloseCode::Policy, "two pings went unanswered"));
                }
                unanswered += 1;
                Message::Ping(Vec::new())
            }
            () = closing.cancelled() => break Some((poem::web::websocket::CloseCode::Away, "server shutting down")),
        };
        match tokio::time::timeout(send_timeout, sink.send(outgoing)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break None,
            Err(_) => {
                metrics.dropped.with_label_values(&["write_timeout"]).inc();
                break None;
            }
        }
    };
    if let Some((code, text)) = reason {
        let _ = tokio::time::timeout(send_timeout, sink.send(Message::Close(Some((code, text.into()))))).await;
    }
}
