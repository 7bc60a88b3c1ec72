//! Writes to claimed messages: every transition a worker's outcome makes (sent, a failed
//! attempt, released, expired), each conditional on the claim it reports under. Many outcomes
//! go in one unordered `update` command ([`MessageStore::apply_outcomes`]); an operator's
//! single re-queue goes through the same conditional `MessageStore::transition`.
//!
//! Commits, the bulk of a drain, do not take a statement each: the commits made under one
//! claim share one pipeline statement per [`COMMIT_CHUNK`] messages, which looks each message's
//! own values up in the statement's constants ([`commit_statements`]). A statement costs the
//! SecantusDB test server about 150 µs of CPU before it touches a document (measured: 211 µs
//! per commit as a statement each, 65 µs in statements of 20–50); real MongoDB also parses,
//! plans and logs each statement on its own. Pipeline updates with constants (`c`) need
//! MongoDB 5.0 or later.

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

/// Most commits one pipeline statement applies: the statement's cost is shared by that many,
/// while each message's lookup of its own values walks the statement's ids (measured on the
/// SecantusDB test server: 65 µs per commit at 20, 68 at 50, 80 at 100).
pub const COMMIT_CHUNK: usize = 32;

/// A commit's values, so that the commits made under one claim can be applied by one
/// statement ([`commit_statements`]).
#[derive(Debug, Clone)]
pub(super) struct CommitRow {
    /// The claim it commits under.
    token: String,
    /// The provider that accepted it, and when the commit was written: mostly the same for a
    /// whole report, so set once per statement.
    provider: Option<String>,
    now: DateTime,
    /// Its own fields; `attempts_log` holds the attempts to append to the log.
    own: Document,
}

impl CommitRow {
    /// What commits must share to go in one statement.
    fn shape(&self) -> (&str, Option<&str>, DateTime, Vec<&String>) {
        (
            &self.token,
            self.provider.as_deref(),
            self.now,
            self.own.keys().collect(),
        )
    }
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
    /// A commit's own values, for [`commit_statements`].
    pub(super) commit: Option<CommitRow>,
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
        let mut row = doc! {"sent_at": accepted.sent_at};
        if let Some(mid) = accepted.webhook_message_id {
            row.insert("webhook_message_id", mid);
        }
        if !attempts.is_empty() {
            let each = attempts.iter().map(bson::to_bson).collect::<Result<Vec<_>, _>>()?;
            row.insert("attempts_log", each);
        }
        let mut update = doc! {"$set": set, "$unset": {"lease_until": ""}};
        push_attempts(&mut update, attempts)?;
        Ok(Self {
            id,
            filter: Self::claimed(id, token),
            update,
            to: MessageStatus::Sent,
            sent_at: Some(accepted.sent_at),
            commit: Some(CommitRow {
                token: token.to_owned(),
                provider: accepted.provider.map(str::to_owned),
                now,
                own: row,
            }),
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
            commit: None,
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
            commit: None,
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
            commit: None,
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
        let updated = self.counts.doubting(
            self.messages
                .find_one_and_update(filter, update)
                .with_options(
                    FindOneAndUpdateOptions::builder()
                        .return_document(ReturnDocument::After)
                        .build(),
                )
                .await,
        )?;
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
    /// to (each write stays conditional on its claim; mostly that is one command, its commits
    /// grouped by [`commit_statements`]) and returns how many matched.
    pub async fn apply_outcomes(&self, writes: Vec<ClaimWrite>) -> Result<u64, StoreError> {
        let mut groups: Vec<(MessageStatus, Option<DateTime>, Vec<Document>)> = Vec::new();
        let mut commits = Vec::new();
        for write in writes {
            let group = match groups.iter().position(|(to, ..)| *to == write.to) {
                Some(index) => index,
                None => {
                    groups.push((write.to, None, Vec::new()));
                    groups.len() - 1
                }
            };
            let first = &mut groups[group].1;
            *first = (*first).min(write.sent_at).or(*first).or(write.sent_at);
            match write.commit {
                Some(row) => commits.push((write.id, row)),
                None => groups[group].2.push(doc! {"q": write.filter, "u": write.update}),
            }
        }
        if !commits.is_empty() {
            let statements = commit_statements(commits);
            if let Some((.., updates)) = groups.iter_mut().find(|(to, ..)| *to == MessageStatus::Sent) {
                updates.extend(statements);
            }
        }
        let applied =
            futures::future::try_join_all(groups.into_iter().map(|(to, first_sent_at, updates)| async move {
                let n = self.counts.doubting(self.update_unordered(updates).await)?;
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
    /// shortening a lease; answers how many were still held. One unordered command with a
    /// statement per claim token (a worker's claims mostly share one), each update conditional
    /// on its claim as an outcome is.
    pub async fn extend_claims(&self, claims: &[(ObjectId, String)], until: DateTime) -> Result<u64, StoreError> {
        if claims.is_empty() {
            return Ok(0);
        }
        let mut by_token: Vec<(&str, Vec<ObjectId>)> = Vec::new();
        for (id, token) in claims {
            match by_token.iter_mut().find(|(t, _)| *t == token.as_str()) {
                Some((_, ids)) => ids.push(*id),
                None => by_token.push((token, vec![*id])),
            }
        }
        let updates = by_token
            .into_iter()
            .map(|(token, ids)| {
                doc! {
                    "q": {"_id": {"$in": ids}, "status": MessageStatus::Processing.as_str(), "claim_token": token},
                    // While a message is processing its `next_attempt_at` is its lease end.
                    "u": {"$max": {"lease_until": until, "next_attempt_at": until}},
                    "multi": true,
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

/// The statements that apply `commits`: those under one claim, from one provider and of the
/// same fields share a pipeline statement per [`COMMIT_CHUNK`], still conditional on the claim
/// for each message. Each message finds its own values in the statement's constants by its
/// position in `ids` (`$indexOfArray` compares ObjectIds as they are; a lookup by the id as a
/// string would need `$getField` with a computed name, MongoDB 7.2 or later). Constants are
/// values, never read as expressions, so a provider's id that starts with `$` is stored as it
/// came; the provider's name goes in as a `$literal` for the same reason.
fn commit_statements(commits: Vec<(ObjectId, CommitRow)>) -> Vec<Document> {
    let mut groups: Vec<(CommitRow, Vec<(ObjectId, Document)>)> = Vec::new();
    for (id, row) in commits {
        match groups.iter_mut().find(|(first, _)| first.shape() == row.shape()) {
            Some((_, rows)) => rows.push((id, row.own)),
            None => {
                let own = row.own.clone();
                groups.push((row, vec![(id, own)]));
            }
        }
    }
    let mut statements = Vec::new();
    for (first, rows) in groups {
        // One stage finds the message's own values (`_o`), the next sets every field from
        // them and removes `_o` and the lease (each `$set` expression reads the stage's input).
        let mut set = doc! {
            "status": MessageStatus::Sent.as_str(),
            "last_transition": Transition::Sent.as_str(),
            "updated_at": first.now,
            "_o": "$$REMOVE",
            "lease_until": "$$REMOVE",
        };
        if let Some(provider) = &first.provider {
            set.insert("provider", doc! {"$literal": provider});
        }
        for field in first.own.keys() {
            let value = format!("$_o.{field}");
            if field == "attempts_log" {
                let appended = doc! {"$concatArrays": [{"$ifNull": ["$attempts_log", []]}, value]};
                set.insert(field, doc! {"$slice": [appended, -(ATTEMPTS_LOG_LEN as i32)]});
            } else {
                set.insert(field, value);
            }
        }
        for chunk in rows.chunks(COMMIT_CHUNK) {
            let ids: Vec<ObjectId> = chunk.iter().map(|(id, _)| *id).collect();
            let values: Vec<&Document> = chunk.iter().map(|(_, own)| own).collect();
            statements.push(doc! {
                "q": {"_id": {"$in": &ids}, "status": MessageStatus::Processing.as_str(), "claim_token": &first.token},
                "multi": true,
                "c": {"ids": &ids, "rows": values},
                "u": [
                    {"$set": {"_o": {"$arrayElemAt": ["$$rows", {"$indexOfArray": ["$$ids", "$_id"]}]}}},
                    {"$set": set.clone()},
                ],
            });
        }
    }
    statements
}
