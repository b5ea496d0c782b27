//! The backfill: brings the products the catalogue already holds into the
//! ledger, a batch of users per transaction.
//!
//! Each batch is scanned without locks; only the users whose ledger differs
//! from their live products are then locked (in user id order, the lock
//! `usage_reserve` takes), read again and repaired, with one `backfill` audit
//! row each. A Reserve or Release of such a user waits for the batch to commit
//! and then works on the corrected ledger, so nothing it does is lost or
//! counted twice. A second run finds nothing to change and writes nothing.
//!
//! A few workers take batches in user id order, each batch in a transaction
//! of its own; batches hold different users, so workers never wait for each
//! other. Once every batch up to some user has committed, that user is
//! recorded in `backfill_checkpoints`, so a run killed half-way resumes after
//! it, repeating at most the batches in flight, which then change nothing.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio_postgres::types::Type;
use tracing::info;

use super::{
    catalogue::Catalogue,
    job_lock,
    ledger::{self, AuditStyle},
    sql, Store, StoreError,
};
use crate::usage::drift::Repair;

/// Advisory lock key held by a running backfill, so that two never overlap.
pub const BACKFILL_LOCK_KEY: i64 = 0x7573_6167_655f_6266; // "usage_bf"

/// Actor recorded in the audit rows a backfill writes.
const ACTOR: &str = "usage-service backfill";

/// How a backfill runs.
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// Users per batch, and so per transaction.
    pub batch_size: usize,
    /// Report what would change without writing anything.
    pub dry_run: bool,
    /// Start from the first user even if an interrupted run left a checkpoint.
    pub restart: bool,
    /// How old a slot without a live product must be before it is released.
    pub orphan_grace: Duration,
    /// Batches in flight at once, each on its own connection.
    pub workers: usize,
}

impl Default for BackfillOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            batch_size: 2000,
            dry_run: false,
            restart: false,
            orphan_grace: Duration::from_secs(600),
        }
    }
}

/// Where a running backfill is, reported after each batch.
#[derive(Debug, Clone, Default)]
pub struct BackfillProgress {
    /// Users with a live product when the run started (the bar's length).
    pub users_estimate: u64,
    /// Users scanned so far by this run.
    pub users_scanned: u64,
    /// Batches committed (or, in a dry run, scanned) so far.
    pub batches: u64,
    /// The last user of the last batch.
    pub last_user_id: String,
}

/// What a backfill changed (or, in a dry run, would change).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackfillSummary {
    /// True when nothing was written.
    pub dry_run: bool,
    /// The user an interrupted run had completed, when this run resumed after it.
    pub resumed_after: Option<String>,
    /// Users scanned.
    pub users_scanned: u64,
    /// Users whose ledger or counter changed.
    pub users_changed: u64,
    /// Users who got a counter row (at the default tier).
    pub users_created: u64,
    /// Slots taken for live products.
    pub slots_added: u64,
    /// Slots released for want of a live product.
    pub slots_removed: u64,
    /// Users whose counter differed from their ledger.
    pub counters_corrected: u64,
    /// Users above their limit afterwards; they keep every slot.
    pub users_over_limit: u64,
    /// Batches.
    pub batches: u64,
}

impl BackfillSummary {
    fn record(&mut self, repair: &Repair) {
        if !repair.is_needed() {
            return;
        }
        self.users_changed += 1;
        self.users_created += u64::from(!repair.has_row);
        self.slots_added += repair.add.len() as u64;
        self.slots_removed += repair.remove.len() as u64;
        self.counters_corrected += u64::from(repair.counter_wrong());
        self.users_over_limit += u64::from(repair.over_limit());
    }
}

/// Why a backfill stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// Another backfill holds the lock.
    #[error("another backfill is running against this database; wait for it to finish")]
    AlreadyRunning,

    /// The database failed; rerunning resumes after the last committed batch.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tokio_postgres::Error> for BackfillError {
    fn from(err: tokio_postgres::Error) -> Self {
        Self::Store(err.into())
    }
}

impl From<deadpool_postgres::PoolError> for BackfillError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        Self::Store(err.into())
    }
}

/// Runs a backfill of `catalogue` to the end, calling `on_progress` after
/// every batch. Memory holds one batch at a time, whatever the number of users.
/// A dry run takes no lock: it writes nothing, so it may overlap anything.
pub async fn run(
    store: &Store,
    catalogue: &Catalogue,
    options: &BackfillOptions,
    mut on_progress: impl FnMut(&BackfillProgress) + Send,
) -> Result<BackfillSummary, BackfillError> {
    let feature = catalogue.feature();
    let job = batches(store, catalogue, options, &mut on_progress);
    let summary = if options.dry_run {
        job.await?
    } else {
        job_lock::run_alone(store, BACKFILL_LOCK_KEY, job)
            .await?
            .ok_or(BackfillError::AlreadyRunning)?
    };
    info!(
        feature,
        dry_run = summary.dry_run,
        users_scanned = summary.users_scanned,
        users_changed = summary.users_changed,
        users_created = summary.users_created,
        slots_added = summary.slots_added,
        slots_removed = summary.slots_removed,
        counters_corrected = summary.counters_corrected,
        users_over_limit = summary.users_over_limit,
        "backfill finished"
    );
    Ok(summary)
}

/// The next batch to hand out: batches are cut in user id order.
struct Cursor {
    after: String,
    next_batch: u64,
    exhausted: bool,
}

/// What the workers have done so far.
struct Tally {
    summary: BackfillSummary,
    progress: BackfillProgress,
    /// Batches completed out of order, by number, with their last user.
    completed: BTreeMap<u64, String>,
    /// The first batch not yet covered by the checkpoint.
    next_checkpoint: u64,
}

async fn batches<F: FnMut(&BackfillProgress) + Send>(
    store: &Store,
    catalogue: &Catalogue,
    options: &BackfillOptions,
    on_progress: &mut F,
) -> Result<BackfillSummary, BackfillError> {
    let feature = catalogue.feature();
    let client = store.pool().get().await?;
    let mut summary = BackfillSummary {
        dry_run: options.dry_run,
        ..BackfillSummary::default()
    };

    let mut after = String::new();
    if options.restart && !options.dry_run {
        store
            .query(
                &client,
                sql::BACKFILL_CHECKPOINT_CLEAR,
                &[(&feature, Type::TEXT)],
            )
            .await?;
    } else if !options.restart {
        if let Some(row) = store
            .query(
                &client,
                sql::BACKFILL_CHECKPOINT_GET,
                &[(&feature, Type::TEXT)],
            )
            .await?
            .first()
        {
            after = row.try_get(0).map_err(StoreError::from)?;
            info!(feature, last_user_id = %after, "resuming an interrupted backfill");
            summary.resumed_after = Some(after.clone());
        }
    }

    let users_estimate: i64 = store
        .query_one(&client, catalogue.count_users_sql(), &[])
        .await?
        .try_get(0)
        .map_err(StoreError::from)?;
    drop(client);

    let cursor = tokio::sync::Mutex::new(Cursor {
        after,
        next_batch: 0,
        exhausted: false,
    });
    let tally = Mutex::new(Tally {
        summary,
        progress: BackfillProgress {
            users_estimate: users_estimate.max(0) as u64,
            ..BackfillProgress::default()
        },
        completed: BTreeMap::new(),
        next_checkpoint: 0,
    });
    let on_progress = Mutex::new(on_progress);
    let workers = (0..options.workers.max(1))
        .map(|_| worker(store, catalogue, options, &cursor, &tally, &on_progress));
    futures::future::try_join_all(workers).await?;

    if !options.dry_run {
        let client = store.pool().get().await?;
        store
            .query(
                &client,
                sql::BACKFILL_CHECKPOINT_CLEAR,
                &[(&feature, Type::TEXT)],
            )
            .await?;
    }
    let tally = tally.into_inner().unwrap_or_else(PoisonError::into_inner);
    Ok(tally.summary)
}

/// Takes batches from `cursor` until none is left, each in a transaction of
/// its own on this worker's connection. Batches of different workers hold
/// different users, so their locks never meet.
async fn worker<F: FnMut(&BackfillProgress) + Send>(
    store: &Store,
    catalogue: &Catalogue,
    options: &BackfillOptions,
    cursor: &tokio::sync::Mutex<Cursor>,
    tally: &Mutex<Tally>,
    on_progress: &Mutex<&mut F>,
) -> Result<(), BackfillError> {
    let feature = catalogue.feature();
    let mut client = store.pool().get().await?;
    let page_size = options.batch_size.max(1) as i64;
    loop {
        let (batch, users) = {
            let mut cursor = cursor.lock().await;
            if cursor.exhausted {
                return Ok(());
            }
            let users: Vec<String> = store
                .query(
                    &client,
                    catalogue.users_after_sql(),
                    &[
                        (&feature, Type::TEXT),
                        (&cursor.after, Type::TEXT),
                        (&page_size, Type::INT8),
                    ],
                )
                .await?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()
                .map_err(StoreError::from)?;
            let Some(last) = users.last() else {
                cursor.exhausted = true;
                return Ok(());
            };
            cursor.after.clone_from(last);
            cursor.next_batch += 1;
            (cursor.next_batch - 1, users)
        };
        let last = users.last().cloned().unwrap_or_default();

        let repairs = one_batch(store, &mut client, catalogue, options, &users).await?;

        let checkpoint = {
            let mut tally = tally.lock().unwrap_or_else(PoisonError::into_inner);
            let tally = &mut *tally;
            repairs.iter().for_each(|r| tally.summary.record(r));
            tally.summary.users_scanned += users.len() as u64;
            tally.summary.batches += 1;
            tally.completed.insert(batch, last.clone());
            let mut checkpoint = None;
            while let Some(user) = tally.completed.remove(&tally.next_checkpoint) {
                checkpoint = Some(user);
                tally.next_checkpoint += 1;
            }

            let summary = &tally.summary;
            tally.progress.users_scanned = summary.users_scanned;
            tally.progress.batches = summary.batches;
            tally.progress.last_user_id.clone_from(&last);
            info!(
                feature,
                batch = summary.batches,
                users_scanned = summary.users_scanned,
                users_estimate = tally.progress.users_estimate,
                users_changed = summary.users_changed,
                slots_added = summary.slots_added,
                slots_removed = summary.slots_removed,
                last_user_id = %last,
                "backfill progress"
            );
            let mut on_progress = on_progress.lock().unwrap_or_else(PoisonError::into_inner);
            on_progress(&tally.progress);
            checkpoint
        };

        // Written once every earlier batch has committed, so resuming after
        // it skips no user. A kill before this write only means the next run
        // repeats a batch, which then changes nothing.
        if let (Some(checkpoint), false) = (checkpoint, options.dry_run) {
            store
                .query(
                    &client,
                    sql::BACKFILL_CHECKPOINT_SET,
                    &[(&feature, Type::TEXT), (&checkpoint, Type::TEXT)],
                )
                .await?;
        }
    }
}

/// Scans one batch and, unless dry, repairs the users that need it in one
/// transaction. Returns the repairs made (or proposed).
async fn one_batch(
    store: &Store,
    client: &mut deadpool_postgres::Object,
    catalogue: &Catalogue,
    options: &BackfillOptions,
    users: &[String],
) -> Result<Vec<Repair>, BackfillError> {
    let scanned = ledger::scan(store, &*client, catalogue, users, options.orphan_grace).await?;
    let needed: Vec<Repair> = scanned
        .iter()
        .map(Repair::plan)
        .filter(Repair::is_needed)
        .collect();
    if options.dry_run || needed.is_empty() {
        return Ok(needed);
    }

    let tx = client.transaction().await?;
    let lock_users: Vec<String> = needed.iter().map(|r| r.user_id.clone()).collect();
    let create: Vec<String> = needed
        .iter()
        .filter(|r| !r.has_row)
        .map(|r| r.user_id.clone())
        .collect();
    let created: HashSet<&str> = create.iter().map(String::as_str).collect();
    let locked = ledger::lock(
        store,
        &tx,
        catalogue,
        &lock_users,
        &create,
        options.orphan_grace,
    )
    .await?;
    let mut repairs: Vec<Repair> = locked.iter().map(Repair::plan).collect();
    // A user created in this transaction counts as created.
    for repair in &mut repairs {
        repair.has_row = !created.contains(repair.user_id.as_str());
    }
    ledger::apply(
        store,
        &tx,
        catalogue.feature(),
        &repairs,
        AuditStyle::Backfill,
        ACTOR,
    )
    .await?;
    tx.commit().await?;
    Ok(repairs)
}
