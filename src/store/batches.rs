//! What Reserve, Release and Get send when calls are coalesced (see
//! [`super::coalesce`]): one call alone as its own statement, several as one
//! statement of the batch form.

use std::future::Future;

use tokio_postgres::{types::Type, Row};
use tracing::warn;

use super::{
    coalesce::{Answers, Batch},
    sql, usage_from_row, Store, StoreError,
};
use crate::usage::{Caller, ReserveAction, Usage};

/// Most calls sent in one batch statement, unless configured otherwise
/// (`--db-batch-max`).
pub(crate) const MAX_BATCH: usize = 100;

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

    async fn run(&self, (): (), calls: Vec<WriteCall>) -> Answers<Row> {
        let store = &self.0;
        if let [call] = calls.as_slice() {
            return vec![store.write_one(call).await];
        }
        crate::metrics::record_batch("write", calls.len());
        match store.write_batch(&calls).await {
            Ok(answers) => answers,
            Err(err) => fall_back("write", err, &calls, |call| store.write_one(call)).await,
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

    async fn run(&self, (): (), calls: Vec<(String, String)>) -> Answers<Usage> {
        let store = &self.0;
        if let [(user_id, feature)] = calls.as_slice() {
            return vec![store.get_one(user_id, feature).await];
        }
        crate::metrics::record_batch("get", calls.len());
        match store.get_batch(&calls).await {
            Ok(answers) => answers,
            Err(err) => {
                fall_back("get", err, &calls, |(user_id, feature)| {
                    store.get_one(user_id, feature)
                })
                .await
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
/// times for it. Any other failure rolled the batch back as a whole, so
/// nothing of it was applied: each call is then sent alone and gets its own
/// answer, and a call the batch form cannot serve no longer fails the others.
async fn fall_back<'a, C, A, Fut>(
    kind: &'static str,
    err: StoreError,
    calls: &'a [C],
    one: impl Fn(&'a C) -> Fut,
) -> Answers<A>
where
    Fut: Future<Output = Result<A, StoreError>>,
{
    if let StoreError::Unavailable(cause) = &err {
        return calls
            .iter()
            .map(|_| Err(StoreError::Unavailable(cause.clone())))
            .collect();
    }
    warn!(kind, calls = calls.len(), cause = %err, "batch statement failed; sending its calls one by one");
    let mut answers = Vec::with_capacity(calls.len());
    for call in calls {
        answers.push(one(call).await);
    }
    answers
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
