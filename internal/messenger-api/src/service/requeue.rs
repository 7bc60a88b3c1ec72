//! An operator sends failed messages back to pending: one by id, or many by filter (a dry
//! run counts first). Each is logged to the audit target.

use herald_core::ErrorCode;

use super::{now, MessengerService};
use crate::domain::{self, MessageDoc, MessageStatus};
use crate::error::ServiceError;
use crate::store::{RequeueFilter, TransitionOutcome};

/// Most messages one bulk re-queue call changes (call again for the rest).
pub const MAX_REQUEUE: usize = 1000;

/// What a bulk re-queue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkRequeue {
    /// Failed messages matching the filter when the call began.
    pub matched: u64,
    /// Re-queued by this call.
    pub requeued: u64,
    /// Still matching after it: call again.
    pub remaining: u64,
}

impl MessengerService {
    /// Operator re-queue of a failed message.
    pub async fn retry(&self, id: &str) -> Result<MessageDoc, ServiceError> {
        let id = domain::parse_id(id)?;
        match self.store.requeue_failed(id, now()).await? {
            TransitionOutcome::Done(doc) => {
                self.metrics.requeued.with_label_values(&["one"]).inc();
                tracing::info!(target: "herald::audit", action = "requeue", message_id = %id, "operator re-queue");
                Ok(doc)
            }
            TransitionOutcome::Conflict(doc) => Err(ServiceError::NotFailed(doc.status.as_str())),
            TransitionOutcome::NotFound => Err(ServiceError::NotFound),
        }
    }

    /// Operator bulk re-queue of failed messages matching `filter`: counts them, and unless
    /// `dry_run` re-queues up to [`MAX_REQUEUE`] of them (oldest first). Idempotent: a message
    /// re-queued is no longer failed, so a second call does not touch it again.
    pub async fn requeue_many(&self, filter: &RequeueFilter, dry_run: bool) -> Result<BulkRequeue, ServiceError> {
        let bad = |msg: String| ServiceError::invalid(ErrorCode::InvalidRequeueFilter, msg);
        if filter.status != MessageStatus::Failed {
            return Err(bad(format!(
                "only failed messages can be re-queued; the filter asks for {}",
                filter.status.as_str()
            )));
        }
        if let (Some(from), Some(to)) = (filter.created_from, filter.created_to) {
            if from > to {
                return Err(bad("createdFrom must not be after createdTo".into()));
            }
        }
        let mut filter = filter.clone();
        if let Some(to) = &filter.to {
            filter.to = Some(domain::validate_phone(to).map_err(|e| bad(e.to_string()))?);
        }
        let matched = self.store.count_failed(&filter).await?;
        let requeued = if dry_run || matched == 0 {
            0
        } else {
            self.store.requeue_failed_matching(&filter, MAX_REQUEUE, now()).await?
        };
        self.metrics.requeued.with_label_values(&["bulk"]).inc_by(requeued);
        tracing::info!(
            target: "herald::audit",
            action = "bulk_requeue",
            dry_run,
            created_from = ?filter.created_from,
            created_to = ?filter.created_to,
            to = filter.to.as_deref().map(telemetry::mask_phone).unwrap_or_default(),
            matched,
            requeued,
            "operator bulk re-queue"
        );
        Ok(BulkRequeue {
            matched,
            requeued,
            remaining: matched.saturating_sub(requeued),
        })
    }
}
