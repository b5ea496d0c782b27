//! What Reserve, Release and Get send when calls are coalesced (see
//! [`super::coalesce`]): one call alone as its own statement, several as one
//! statement of the batch form.

use std::{collections::HashMap, future::Future, hash::Hash};

use futures::StreamExt as _;
use tokio_postgres::{types::Type, Row};
use tracing::warn;

use super::{
    coalesce::{Answers, Batch, Replies},
    sql, usage_from_row, Store, StoreError,
};
use crate::usage::{Caller, ReserveAction, Usage};

/// Most calls sent in one batch statement, unless configured otherwise
/// (`--db-batch-max`).
pub(crate) const MAX_BATCH: usize = 100;

/// The longest a batch of writes waits for any one lock (PostgreSQL's
/// `lock_timeout`, for the batch's transaction only). Batches wait for each
/// other's locks for a few milliseconds when they share a busy user; a row
/// held longer (a backfill's batch of users, a session idle in a
/// transaction) would otherwise hold up every user of the batch. Past it the
/// batch is sent again call by call, and only the held user's calls wait.
const BATCH_LOCK_WAIT: &str = "200ms";

/// Users of a failed batch whose calls are sent again at once: enough that a
/// user stuck behind a lock holds up no other, few enough to leave the
/// pool's connections to the calls still arriving.
const FALL_BACK_AT_ONCE: usize = 8;

/// One Reserve or Release call, owned so that it can wait in a queue.
pub(crate) struct WriteCall {
    user_id: String,
    feature: String,
    kind: WriteKind,
    product_id: String,
    actor: Option<String>,
    request_id: Option<String>,
}

enum WriteKind {
    Reserve {
        action: ReserveAction,
        /// The hold's time-to-live in seconds; `None` for a permanent slot.
        hold_secs: Option<f64>,
    },
    Release,
}

impl WriteCall {
    pub(crate) fn reserve(
        user_id: &str,
        feature: &str,
        product_id: &str,
        action: ReserveAction,
        hold_secs: Option<f64>,
        caller: &Caller,
    ) -> Self {
        let kind = WriteKind::Reserve { action, hold_secs };
        Self::new(user_id, feature, kind, product_id, caller)
    }

    pub(crate) fn release(user_id: &str, feature: &str, product_id: &str, caller: &Caller) -> Self {
        Self::new(user_id, feature, WriteKind::Release, product_id, caller)
    }

    fn new(
        user_id: &str,
        feature: &str,
        kind: WriteKind,
        product_id: &str,
        caller: &Caller,
    ) -> Self {
        Self {
            user_id: user_id.to_owned(),
            feature: feature.to_owned(),
            kind,
            product_id: product_id.to_owned(),
            actor: caller.actor.clone(),
            request_id: caller.request_id.clone(),
        }
    }
}

/// Reserves and Releases of any users: a batch runs each call as it would
/// run alone, in one transaction whose commit serves them all. Answers are
/// the rows of `reserve.sql` / `release.sql`.
#[derive(Clone)]
pub(crate) struct Writes(pub(crate) Store);

impl Batch for Writes {
    type Key = ();
    type Item = WriteCall;
    type Answer = Row;

    async fn run(&self, (): (), calls: Vec<WriteCall>, replies: &Replies<Row>) {
        let store = &self.0;
        if let [call] = calls.as_slice() {
            return replies.send(0, store.write_one(call).await);
        }
        crate::metrics::record_batch("write", calls.len());
        match store.write_batch(&calls).await {
            Ok(answers) => replies.send_all(answers),
            Err(err) => {
                let user = |call: &WriteCall| (call.user_id.clone(), call.feature.clone());
                let one = |call| store.write_one(call);
                fall_back("write", err, &calls, replies, user, one).await;
            }
        }
    }
}

/// Gets of any users: reads take no locks, so one statement can serve
/// everyone's. Answers are usages.
#[derive(Clone)]
pub(crate) struct Gets(pub(crate) Store);

impl Batch for Gets {
    type Key = ();
    type Item = (String, String);
    type Answer = Usage;

    async fn run(&self, (): (), calls: Vec<(String, String)>, replies: &Replies<Usage>) {
        let store = &self.0;
        if let [(user_id, feature)] = calls.as_slice() {
            return replies.send(0, store.get_one(user_id, feature).await);
        }
        crate::metrics::record_batch("get", calls.len());
        match store.get_batch(&calls).await {
            Ok(answers) => replies.send_all(answers),
            Err(err) => {
                fall_back(
                    "get",
                    err,
                    &calls,
                    replies,
                    |_| (),
                    |(user_id, feature)| store.get_one(user_id, feature),
                )
                .await;
            }
        }
    }
}

impl Store {
    /// One Reserve or Release, as its own statement.
    async fn write_one(&self, call: &WriteCall) -> Result<Row, StoreError> {
        let (user_id, feature) = (&call.user_id, &call.feature);
        match &call.kind {
            WriteKind::Reserve { action, hold_secs } => {
                self.query_one_repeatable(
                    sql::RESERVE,
                    &[
                        (user_id, Type::TEXT),
                        (feature, Type::TEXT),
                        (&call.product_id, Type::TEXT),
                        (&action.as_audit_action(), Type::TEXT),
                        (&call.actor, Type::TEXT),
                        (&call.request_id, Type::TEXT),
                        (hold_secs, Type::FLOAT8),
                    ],
                )
                .await
            }
            WriteKind::Release => {
                self.query_one_repeatable(
                    sql::RELEASE,
                    &[
                        (user_id, Type::TEXT),
                        (feature, Type::TEXT),
                        (&call.product_id, Type::TEXT),
                        (&call.actor, Type::TEXT),
                        (&call.request_id, Type::TEXT),
                    ],
                )
                .await
            }
        }
    }

    /// Several Reserves and Releases, of one user or many, as one statement
    /// and one transaction; the calls of one user run in their order.
    async fn write_batch(&self, calls: &[WriteCall]) -> Result<Answers<Row>, StoreError> {
        let mut kinds = Vec::with_capacity(calls.len());
        let mut actions = Vec::with_capacity(calls.len());
        let mut holds = Vec::with_capacity(calls.len());
        for call in calls {
            let (kind, action, hold) = match &call.kind {
                WriteKind::Reserve { action, hold_secs } => {
                    ("reserve", Some(action.as_audit_action()), *hold_secs)
                }
                WriteKind::Release => ("release", None, None),
            };
            kinds.push(kind);
            actions.push(action);
            holds.push(hold);
        }
        let users: Vec<&str> = calls.iter().map(|c| c.user_id.as_str()).collect();
        let features: Vec<&str> = calls.iter().map(|c| c.feature.as_str()).collect();
        let products: Vec<&str> = calls.iter().map(|c| c.product_id.as_str()).collect();
        let actors: Vec<Option<&str>> = calls.iter().map(|c| c.actor.as_deref()).collect();
        let request_ids: Vec<Option<&str>> =
            calls.iter().map(|c| c.request_id.as_deref()).collect();
        let rows = self
            .query_repeatable(
                sql::WRITE_BATCH,
                &[
                    (&users, Type::TEXT_ARRAY),
                    (&features, Type::TEXT_ARRAY),
                    (&kinds, Type::TEXT_ARRAY),
                    (&products, Type::TEXT_ARRAY),
                    (&actions, Type::TEXT_ARRAY),
                    (&actors, Type::TEXT_ARRAY),
                    (&request_ids, Type::TEXT_ARRAY),
                    (&holds, Type::FLOAT8_ARRAY),
                    (&BATCH_LOCK_WAIT, Type::TEXT),
                ],
            )
            .await?;
        by_position(calls.len(), rows, |_, row| Ok(row))
    }

    /// The usage of one user, as its own statement.
    async fn get_one(&self, user_id: &str, feature: &str) -> Result<Usage, StoreError> {
        let row = self
            .query_repeatable(sql::GET, &[(&user_id, Type::TEXT), (&feature, Type::TEXT)])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::UnknownFeature(feature.to_owned()))?;
        usage_from_row(user_id, feature, &row)
    }

    /// The usage of several users, as one statement.
    async fn get_batch(&self, calls: &[(String, String)]) -> Result<Answers<Usage>, StoreError> {
        let users: Vec<&str> = calls.iter().map(|(u, _)| u.as_str()).collect();
        let features: Vec<&str> = calls.iter().map(|(_, f)| f.as_str()).collect();
        let rows = self
            .query_repeatable(
                sql::GET_MANY,
                &[(&users, Type::TEXT_ARRAY), (&features, Type::TEXT_ARRAY)],
            )
            .await?;
        let mut answers = by_position(calls.len(), rows, |i, row| {
            let (user_id, feature) = &calls[i];
            usage_from_row(user_id, feature, &row)
        })?;
        // A pair without a row names a feature that does not exist.
        for (answer, (_, feature)) in answers.iter_mut().zip(calls) {
            if matches!(answer, Err(StoreError::UnexpectedOutcome(_))) {
                *answer = Err(StoreError::UnknownFeature(feature.clone()));
            }
        }
        Ok(answers)
    }
}

/// What the calls of a failed batch get. When the database is unavailable,
/// that, for every call: sending them one by one would only wait `calls`
/// times for it. Any other failure (a lock waited for too long, a deadlock,
/// a call the batch form cannot serve) rolled the batch back as a whole, so
/// nothing of it was applied: each call is then sent alone and gets its own
/// answer as soon as it has it. The calls of one `group` go one after
/// another, in their order; groups go side by side ([`FALL_BACK_AT_ONCE`] at
/// a time), so a group stuck behind a lock holds up no other.
async fn fall_back<'a, C, K, A, Fut>(
    kind: &'static str,
    err: StoreError,
    calls: &'a [C],
    replies: &Replies<A>,
    group: impl Fn(&'a C) -> K,
    one: impl Fn(&'a C) -> Fut,
) where
    K: Eq + Hash,
    Fut: Future<Output = Result<A, StoreError>>,
{
    if let StoreError::Unavailable(cause) = &err {
        for i in 0..calls.len() {
            replies.send(i, Err(StoreError::Unavailable(cause.clone())));
        }
        return;
    }
    warn!(kind, calls = calls.len(), cause = %err, "batch statement failed; sending its calls one by one");
    let mut groups: HashMap<K, Vec<usize>> = HashMap::new();
    for (i, call) in calls.iter().enumerate() {
        groups.entry(group(call)).or_default().push(i);
    }
    let one = &one;
    let runs = groups.into_values().map(|positions| async move {
        for i in positions {
            replies.send(i, one(&calls[i]).await);
        }
    });
    futures::stream::iter(runs)
        .buffer_unordered(FALL_BACK_AT_ONCE)
        .collect::<()>()
        .await;
}

/// Spreads the rows of a batch statement, each carrying its call's 1-based
/// position in `ord`, over `calls` answers; a call without a row gets
/// [`StoreError::UnexpectedOutcome`].
fn by_position<A>(
    calls: usize,
    rows: Vec<Row>,
    answer: impl Fn(usize, Row) -> Result<A, StoreError>,
) -> Result<Answers<A>, StoreError> {
    let mut answers: Answers<A> = (0..calls)
        .map(|_| {
            Err(StoreError::UnexpectedOutcome(
                "no row for this call".to_owned(),
            ))
        })
        .collect();
    for row in rows {
        let ord: i32 = row.try_get("ord")?;
        let i = usize::try_from(ord - 1)
            .ok()
            .filter(|&i| i < calls)
            .ok_or_else(|| {
                StoreError::UnexpectedOutcome(format!("row for call {ord} of {calls}"))
            })?;
        answers[i] = answer(i, row);
    }
    Ok(answers)
}
