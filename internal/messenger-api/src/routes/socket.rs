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

use super::live::{parse_filter, too_many};
use crate::events::{EventFeed, EventFilter, EventType, Slot, SubscriberSlots};

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

/// A close frame's reason fits in 123 bytes (RFC 6455 §5.5: a control frame carries at most
/// 125, two of them the code). The internal code comes first, so it survives the cut.
fn close_reason(mut reason: String) -> String {
    const MAX: usize = 123;
    if reason.len() > MAX {
        let mut end = MAX - '…'.len_utf8();
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
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
    slots: Data<&SubscriberSlots>,
    timing: Data<&SocketTiming>,
) -> Response {
    // With the key on the upgrade, a refusal is an HTTP answer; with it in the first frame, a
    // close frame carrying the same code.
    let slot = match bearer(req).map(|key| keys.authorize(key, Scope::MessagesRead)) {
        Some(Ok(caller)) => match slots.take(&caller.name) {
            Some(slot) => Some(slot),
            None => return too_many(&slots, &caller).as_response_owned(),
        },
        Some(Err(refusal)) => return refusal.error().as_response_owned(),
        None => None,
    };
    let feed = feed.0.clone();
    let keys = keys.0.clone();
    let slots = slots.0.clone();
    let timing = *timing.0;
    ws.on_upgrade(move |socket| serve_socket(socket, feed, keys, slots, timing, slot))
        .into_response()
}

async fn serve_socket(
    socket: poem::web::websocket::WebSocketStream,
    feed: EventFeed,
    keys: ApiKeys,
    slots: SubscriberSlots,
    timing: SocketTiming,
    slot: Option<Slot>,
) {
    let (mut sink, mut incoming) = socket.split();
    let send_timeout = timing.ping;
    // Authenticate: the upgrade's header (which took the slot), or the first frame.
    let mut resume = None;
    let _slot = match slot {
        Some(slot) => slot,
        None => {
            let first = tokio::time::timeout(timing.auth, incoming.next()).await;
            let frame = match first {
                Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<ClientFrame>(&text).ok(),
                _ => None,
            };
            let (key, last_event_id) = match frame {
                Some(ClientFrame {
                    auth: Some(key),
                    last_event_id,
                    ..
                }) => (Some(key), last_event_id),
                _ => (None, None),
            };
            let admitted = match key.map(|key| keys.authorize(&key, Scope::MessagesRead)) {
                Some(Ok(caller)) => slots
                    .take(&caller.name)
                    .ok_or_else(|| too_many(&slots, &caller).to_string()),
                Some(Err(refusal)) => Err(refusal.error().to_string()),
                None => Err("send {\"auth\": \"<key>\"} first with an accepted key".into()),
            };
            match admitted {
                Ok(slot) => {
                    resume = last_event_id;
                    slot
                }
                Err(reason) => {
                    let _ = sink
                        .send(Message::Close(Some((
                            poem::web::websocket::CloseCode::Policy,
                            close_reason(reason),
                        ))))
                        .await;
                    return;
                }
            }
        }
    };
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

#[cfg(test)]
mod tests {
    use super::close_reason;

    #[test]
    fn a_close_reason_is_cut_to_fit_a_control_frame_at_a_character_boundary() {
        let long = format!("429003 {}", "é".repeat(200));
        let cut = close_reason(long);
        assert!(
            cut.len() <= 123 && cut.starts_with("429003 ") && cut.ends_with('…'),
            "{cut}"
        );
        assert_eq!(close_reason("short".into()), "short");
    }
}
