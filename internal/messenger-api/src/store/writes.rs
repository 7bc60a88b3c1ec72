//! Writes to claimed messages: every transition a worker's outcome makes (sent, a failed
//! attempt, released, expired), each conditional on the claim it reports under. Many outcomes
//! go in one unordered `update` command ([`MessageStore::apply_outcomes`]); an operator's
//! single re-queue goes through the same conditional `MessageStore::transition`.

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use mongodb::options::{FindOneAndUpdateOptions, ReturnDocument};

use super::counts::Deltas;
use super::{MessageStore, StoreError, COLLECTION};
use crate::domain::{AttemptDoc, LastError, MessageDoc, MessageStatus, Transition};
use herald_core::worker::ATTEMPTS_LOG_LEN;

/// Adds `attempts` to `update`: pushed onto `attempts_log`, which keeps the last
/// [`ATTEMPTS_LOG_LEN`].
fn push_attempts(update: &mut Document, attempts: &[AttemptDoc]) -> Result<(), StoreError> {
    if attempts.is_empty() {
        return Ok(());
    }
    let each = attempts.iter().map(bson::to_bson).collect::<Result<Vec<_>, _>>()?;
    update.insert(
        "$push",
        doc! {"attempts_log": {"$each": each, "$slice": -(ATTEMPTS_LOG_LEN as i32)}},
    );
    Ok(())
}

/// The outcome of one conditional transition.
#[derive(Debug)]
pub enum TransitionOutcome {
    /// Done; the document after the change.
    Done(MessageDoc),
    /// The precondition did not hold; the document as it is.
    Conflict(MessageDoc),
    /// No such message.
    NotFound,
}

/// What a commit says about the accepted send.
#[derive(Debug, Clone, Copy)]
pub struct Accepted<'a> {
    /// The provider's id for it.
    pub webhook_message_id: Option<&'a str>,
    /// When it was accepted.
    pub sent_at: DateTime,
    /// Which provider accepted it.
    pub provider: Option<&'a str>,
}

/// A conditional write to a message: it applies only while its filter holds (for a worker's
/// outcome: while `token` holds the claim).
#[derive(Debug, Clone)]
pub struct ClaimWrite {
    /// The message.
    pub id: ObjectId,
    /// `{_id, status: processing, claim_token}`, or the operator's precondition.
    pub(super) filter: Document,
    /// The transition.
    pub(super) update: Document,
    /// The status it leaves the message in.
    pub(super) to: MessageStatus,
    /// When it was sent, for a commit.
    pub(super) sent_at: Option<DateTime>,
}

impl ClaimWrite {
    fn claimed(id: ObjectId, token: &str) -> Document {
        doc! {"_id": id, "status": MessageStatus::Processing.as_str(), "claim_token": token}
    }

    /// Sent: `provider` accepted it at `sent_at`, after `attempts`.
    pub fn sent(
        id: ObjectId,
        token: &str,
        accepted: Accepted<'_>,
        attempts: &[AttemptDoc],
        now: DateTime,
    ) -> Result<Self, StoreError> {
        let mut set = doc! {
            "status": MessageStatus::Sent.as_str(),
            "sent_at": accepted.sent_at,
            "updated_at": now,
            "last_transition": Transition::Sent.as_str(),
        };
        if let Some(mid) = accepted.webhook_message_id {
            set.insert("webhook_message_id", mid);
        }
        if let Some(provider) = accepted.provider {
            set.insert("provider", provider);
        }
        let mut update = doc! {"$set": set, "$unset": {"lease_until": ""}};
        push_attempts(&mut update, attempts)?;
        Ok(Self {
            id,
            filter: Self::claimed(id, token),
            update,
            to: MessageStatus::Sent,
            sent_at: Some(accepted.sent_at),
        })
    }

    /// A failed attempt: `status` pending (due at `next_attempt_at`), failed, or expired.
    pub fn failure(
        id: ObjectId,
        token: &str,
        status: MessageStatus,
        next_attempt_at: DateTime,
        error: &LastError,
        attempts: &[AttemptDoc],
        now: DateTime,
    ) -> Result<Self, StoreError> {
        let transition = match status {
            MessageStatus::Failed => Transition::Failed,
            MessageStatus::Expired => Transition::Expired,
            _ => Transition::RetryScheduled,
        };
        let mut update = doc! {
            "$set": {
                "status": status.as_str(),
                "next_attempt_at": next_attempt_at,
                "last_error": bson::to_bson(error)?,
                "updated_at": now,
                "last_transition": transition.as_str(),
            },
            "$unset": {"lease_until": ""},
        };
        push_attempts(&mut update, attempts)?;
        Ok(Self {
            id,
            filter: Self::claimed(id, token),
            update,
            to: status,
            sent_at: None,
        })
    }

    /// The write that ends a message `expired`.
    pub(super) fn expired(now: DateTime) -> Document {
        doc! {
            "$set": {
                "status": MessageStatus::Expired.as_str(),
                "next_attempt_at": now,
                "updated_at": now,
                "last_transition": Transition::Expired.as_str(),
            },
            "$unset": {"lease_until": ""},
        }
    }

    /// Expired before it could be sent: final, and the attempt not counted (it never went out).
    pub fn expire(id: ObjectId, token: &str, now: DateTime) -> Self {
        Self {
            id,
            filter: Self::claimed(id, token),
            update: {
                let mut update = Self::expired(now);
                update.insert("$inc", doc! {"attempts": -1});
                update
            },
            to: MessageStatus::Expired,
            sent_at: None,
        }
    }

    /// Given back unsent: pending, the attempt not counted; due now, or — when it waits for
    /// a paused provider — at `wait_until`, marked waiting for a provider.
    pub fn release(id: ObjectId, token: &str, wait_until: Option<DateTime>, now: DateTime) -> Self {
        let mut set = doc! {
            "status": MessageStatus::Pending.as_str(),
            "next_attempt_at": wait_until.unwrap_or(now),
            "updated_at": now,
            "last_transition": Transition::Released.as_str(),
        };
        if wait_until.is_some() {
            set.insert("waiting_for_provider", true);
        }
        Self {
            id,
            filter: Self::claimed(id, token),
            update: doc! {
                "$set": set,
                "$unset": {"lease_until": ""},
                "$inc": {"attempts": -1},
            },
            to: MessageStatus::Pending,
            sent_at: None,
        }
    }
}

impl MessageStore {
    /// Applies one conditional `write` to a message in status `from`; answers the document
    /// after it, or as it stands when the precondition did not hold.
    pub(super) async fn transition(
        &self,
        write: ClaimWrite,
        from: MessageStatus,
    ) -> Result<TransitionOutcome, StoreError> {
        let ClaimWrite {
            id, filter, update, to, ..
        } = write;
        let updated = self
            .messages
            .find_one_and_update(filter, update)
            .with_options(
                FindOneAndUpdateOptions::builder()
                    .return_document(ReturnDocument::After)
                    .build(),
            )
            .await?;
        if let Some(doc) = updated {
            self.counts.add(Deltas::moved(from, to, 1)).await;
            return Ok(TransitionOutcome::Done(doc));
        }
        Ok(match self.find(id).await? {
            Some(doc) => TransitionOutcome::Conflict(doc),
            None => TransitionOutcome::NotFound,
        })
    }

    /// Applies every outcome's write with one unordered `update` command per status they lead
    /// to (each write stays conditional on its claim; mostly that is one command) and returns
    /// how many matched.
    pub async fn apply_outcomes(&self, writes: Vec<ClaimWrite>) -> Result<u64, StoreError> {
        let mut groups: Vec<(MessageStatus, Option<DateTime>, Vec<Document>)> = Vec::new();
        for write in writes {
            let update = doc! {"q": write.filter, "u": write.update};
            match groups.iter_mut().find(|(to, ..)| *to == write.to) {
                Some((_, first, updates)) => {
                    *first = (*first).min(write.sent_at).or(*first).or(write.sent_at);
                    updates.push(update);
                }
                None => groups.push((write.to, write.sent_at, vec![update])),
            }
        }
        let applied =
            futures::future::try_join_all(groups.into_iter().map(|(to, first_sent_at, updates)| async move {
                let n = self.update_unordered(updates).await?;
                self.counts
                    .add(
                        Deltas::moved(MessageStatus::Processing, to, n)
                            .with_first_sent_at(first_sent_at.filter(|_| n > 0)),
                    )
                    .await;
                Ok::<_, StoreError>(n)
            }))
            .await?;
        Ok(applied.into_iter().sum())
    }

    /// Extends each of `claims` (id, claim token) still held to last until `until`, never
    /// shortening a lease; answers how many were still held. One unordered command, each
    /// update conditional on its claim as an outcome is.
    pub async fn extend_claims(&self, claims: &[(ObjectId, String)], until: DateTime) -> Result<u64, StoreError> {
        if claims.is_empty() {
            return Ok(0);
        }
        let updates = claims
            .iter()
            .map(|(id, token)| {
                doc! {
                    "q": ClaimWrite::claimed(*id, token),
                    // While a message is processing its `next_attempt_at` is its lease end.
                    "u": {"$max": {"lease_until": until, "next_attempt_at": until}},
                }
            })
            .collect();
        self.update_unordered(updates).await
    }

    /// One unordered `update` command; how many matched.
    async fn update_unordered(&self, updates: Vec<Document>) -> Result<u64, StoreError> {
        let answer = self
            .db
            .run_command(doc! {"update": COLLECTION, "updates": updates, "ordered": false})
            .await?;
        if let Ok(errors) = answer.get_array("writeErrors") {
            if !errors.is_empty() {
                tracing::warn!(errors = errors.len(), "some outcome writes were refused");
            }
        }
        Ok(match answer.get("n") {
            Some(bson::Bson::Int32(n)) => *n as u64,
            Some(bson::Bson::Int64(n)) => *n as u64,
            _ => 0,
        })
    }
}
