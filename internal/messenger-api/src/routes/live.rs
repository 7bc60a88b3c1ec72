//! Live status: the event stream (SSE), the stats snapshot and the run history the console
//! shows. The same events over a WebSocket: [`super::socket`].

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use herald_core::api_errors;
use herald_core::auth::{Caller, MetricsKey, ReadKey};
use herald_core::pagination::PageRequest;
use herald_core::{ApiError, ErrorCode};
use poem::web::sse::Event;
use poem_openapi::param::{Header, Query};
use poem_openapi::payload::{EventStream, Json};
use poem_openapi::types::ToJSON;
use poem_openapi::{ApiResponse, OpenApi};

use super::views::StatsView;
use super::ApiTags;
use crate::domain::{self, MessageStatus};
use crate::events::{EventFeed, EventFilter, FeedEvent, SubscriberSlots};
use crate::service::{JobRemote, Monitor};
use herald_core::jobs::RunView;
use herald_core::pagination::Page;

api_errors!(EventsErrors: 400, 401, 429);
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
    /// Subscriptions per key.
    pub slots: SubscriberSlots,
}

/// The answer to a key that holds its most subscriptions already (SSE and WebSocket alike).
pub fn too_many(slots: &SubscriberSlots, caller: &Caller) -> ApiError {
    ApiError::new(
        ErrorCode::TooManySubscribers,
        format!(
            "The key {:?} already holds {} live subscriptions on this replica (events.max_subscribers_per_key): close one first.",
            caller.name,
            slots.max()
        ),
    )
    .retry_after(1)
}

/// Parses the `status` and `id` filters (400 on a bad value).
pub fn parse_filter(statuses: &[String], ids: &[String]) -> Result<EventFilter, ApiError> {
    let statuses = statuses
        .iter()
        .map(|s| {
            MessageStatus::parse(s).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidStatusFilter,
                    "status must be pending, processing, sent, failed or expired",
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
        auth: ReadKey,
        /// Only message events of these statuses (repeatable): pending, processing, sent, failed,
        /// expired.
        status: Query<Vec<String>>,
        /// Only events of these message ids (repeatable).
        id: Query<Vec<String>>,
        /// Resume after this event id.
        #[oai(name = "Last-Event-ID")]
        last_event_id: Header<Option<String>>,
    ) -> Result<EventsResponse, EventsErrors> {
        let filter = Arc::new(RwLock::new(parse_filter(&status.0, &id.0)?));
        let slot = self
            .slots
            .take(&auth.0.name)
            .ok_or_else(|| too_many(&self.slots, &auth.0))?;
        let subscription = self.feed.subscribe(last_event_id.0.as_deref(), filter).await;
        // The slot goes with the stream: given back when the client leaves.
        let events = subscription.map(move |event| {
            let _held = &slot;
            event
        });
        Ok(EventsResponse::Ok(
            EventStream::new(events.boxed())
                .keep_alive(self.heartbeat)
                .to_event(sse_event),
        ))
    }

    /// Delivery stats
    ///
    /// Counts by status, how long the oldest due message has waited, messages sent in each of
    /// the last 60 minutes (oldest first) and the sending job's state.
    #[oai(path = "/api/messenger/stats", method = "get", operation_id = "getStats")]
    async fn stats(&self, _auth: MetricsKey) -> Result<StatsResponse, StatsErrors> {
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
        _auth: MetricsKey,
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
