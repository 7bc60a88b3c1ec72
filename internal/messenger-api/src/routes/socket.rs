//! The event feed over a WebSocket: the same events as the SSE stream ([`super::live`]), as
//! text frames, with a first-frame login for browsers, `subscribe` frames to narrow, and pings.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use herald_core::auth::{ApiKeys, Scope};
use poem::web::websocket::{Message, WebSocket};
use poem::web::Data;
use poem::{handler, IntoResponse, Request, Response};
use poem_openapi::types::ToJSON;
use serde::Deserialize;

use super::live::parse_filter;
use crate::events::{EventFeed, EventFilter, EventType};

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
    let header_auth = match bearer(req).map(|key| keys.authorize(key, Scope::MessagesRead)) {
        Some(Ok(_)) => true,
        Some(Err(refusal)) => return refusal.error().as_response_owned(),
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
            }) if keys.authorize(&key, Scope::MessagesRead).is_ok() => resume = last_event_id,
            frame => {
                let reason = match frame
                    .and_then(|f| f.auth)
                    .map(|key| keys.authorize(&key, Scope::MessagesRead))
                {
                    Some(Err(refusal)) => refusal.error().to_string(),
                    _ => "send {\"auth\": \"<key>\"} first with an accepted key".into(),
                };
                let _ = sink
                    .send(Message::Close(Some((poem::web::websocket::CloseCode::Policy, reason))))
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
