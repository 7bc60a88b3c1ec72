//! Creating and reading messages: validation, idempotency keys, batches stored all or nothing.

use chrono::Utc;
use herald_core::pagination::{Fetched, PageRequest};
use herald_core::ErrorCode;

use super::{now, MessengerService};
use crate::domain::{self, MessageDoc, MessageStatus};
use crate::error::{ServiceError, StoreError};

/// Most messages in one batch create.
pub const MAX_BATCH: usize = 1000;

impl MessengerService {
    /// Creates one message. With an idempotency key, a repeat with the same body returns the
    /// first message (`false`), another body is a conflict.
    pub async fn create(
        &self,
        draft: domain::Draft<'_>,
        idempotency_key: Option<String>,
    ) -> Result<(MessageDoc, bool), ServiceError> {
        let valid = domain::validate(draft, self.policy.limits(), Utc::now())?;
        if let Some(key) = &idempotency_key {
            if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ServiceError::invalid(
                    ErrorCode::InvalidIdempotencyKey,
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                ));
            }
            if let Some(existing) = self.store.find_by_idempotency_key(key).await? {
                return same_body(existing, &valid).map(|m| (m, false));
            }
        }
        self.admission.admit(1).await?;
        let message = MessageDoc::new_pending(valid.clone(), idempotency_key.clone(), now());
        if message.callback_url.is_some() {
            self.callbacks.note_asked();
        }
        match self.store.insert(&message).await {
            Ok(()) => Ok((message, true)),
            Err(StoreError::AlreadyExists) => {
                // Lost a race with a concurrent request carrying the same key.
                let key = idempotency_key.unwrap_or_default();
                let existing = self
                    .store
                    .find_by_idempotency_key(&key)
                    .await?
                    .ok_or(ServiceError::IdempotencyConflict)?;
                same_body(existing, &valid).map(|m| (m, false))
            }
            Err(other) => Err(other.into()),
        }
    }

    /// Admits one create (one message or one batch) by `caller` under its key's create rate.
    pub async fn admit_key(&self, caller: &herald_core::auth::Caller) -> Result<(), ServiceError> {
        self.admission.admit_key(caller).await
    }

    /// Creates all of `items` or none; a bad item is named by index.
    pub async fn create_batch(&self, items: &[domain::Draft<'_>]) -> Result<Vec<MessageDoc>, ServiceError> {
        if items.is_empty() || items.len() > MAX_BATCH {
            return Err(ServiceError::invalid(
                ErrorCode::BatchSize,
                format!("a batch holds 1 to {MAX_BATCH} messages; this one has {}", items.len()),
            ));
        }
        let stamp = now();
        let limits = self.policy.limits();
        let mut problems = Vec::new();
        let mut docs = Vec::with_capacity(items.len());
        for (index, draft) in items.iter().enumerate() {
            match domain::validate(*draft, limits, stamp.to_chrono()) {
                Ok(valid) => docs.push(MessageDoc::new_pending(valid, None, stamp)),
                Err(error) => problems.push(format!("messages[{index}]: {error}")),
            }
        }
        if !problems.is_empty() {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidBatch,
                format!(
                    "{} invalid item(s), nothing stored: {}",
                    problems.len(),
                    problems.join("; ")
                ),
            ));
        }
        // All or nothing: the whole batch is admitted, or none of it is stored.
        self.admission.admit(docs.len() as u64).await?;
        if docs.iter().any(|d| d.callback_url.is_some()) {
            self.callbacks.note_asked();
        }
        self.store.insert_many(&docs).await?;
        Ok(docs)
    }

    /// A page of messages, newest first, optionally of one status and/or recipient; counted
    /// in all only `with_total`.
    pub async fn list(
        &self,
        status: Option<&str>,
        to: Option<&str>,
        page: &PageRequest,
        with_total: bool,
    ) -> Result<Fetched<MessageDoc>, ServiceError> {
        let to = to.map(domain::validate_phone).transpose()?;
        let status = match status {
            None => None,
            Some(text) => Some(MessageStatus::parse(text).ok_or_else(|| {
                ServiceError::invalid(
                    ErrorCode::InvalidStatusFilter,
                    "status must be pending, processing, sent, failed or expired",
                )
            })?),
        };
        Ok(self.store.list(status, to.as_deref(), page, with_total).await?)
    }

    /// A page of sent messages, newest `sent_at` first; counted in all only `with_total`.
    pub async fn list_sent(&self, page: &PageRequest, with_total: bool) -> Result<Fetched<MessageDoc>, ServiceError> {
        Ok(self.store.list_sent(page, with_total).await?)
    }

    /// One message.
    pub async fn get(&self, id: &str) -> Result<MessageDoc, ServiceError> {
        let id = domain::parse_id(id)?;
        self.store.find(id).await?.ok_or(ServiceError::NotFound)
    }
}

fn same_body(existing: MessageDoc, valid: &domain::ValidMessage) -> Result<MessageDoc, ServiceError> {
    let schedule = domain::Schedule {
        send_at: existing.send_at,
        expires_at: existing.expires_at,
    };
    if existing.to == valid.to
        && existing.content == valid.content
        && schedule == valid.schedule
        && existing.callback_url == valid.callback_url
    {
        Ok(existing)
    } else {
        Err(ServiceError::IdempotencyConflict)
    }
}
