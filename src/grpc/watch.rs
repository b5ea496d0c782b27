//! WatchUsage: a stream of audit events read from the shared `usage_events`
//! table, so a watcher on one replica sees changes made through any other.

use std::{
    pin::Pin,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::{service::UsageApi, status, validate::Violations};
use crate::{
    proto,
    store::{EventFilter, Store, StoredEvent},
    usage::feed::FeedCursor,
};

/// How often a watcher looks for new events.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Most event ids read per look.
const BATCH: i64 = 1000;

/// The stream type of WatchUsage.
pub(crate) type EventStream = Pin<Box<dyn Stream<Item = Result<proto::UsageEvent, Status>> + Send>>;

impl UsageApi {
    pub(super) async fn watch(
        &self,
        request: Request<proto::WatchUsageRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let user_id = (!request.user_id.is_empty())
            .then(|| violations.id("user_id", &request.user_id).to_owned());
        let feature =
            (!request.feature.is_empty()).then(|| violations.feature("feature", &request.feature));
        let cursor = match request.resume_token.as_str() {
            "" => None,
            token => {
                let cursor = FeedCursor::from_token(token);
                if cursor.is_none() {
                    violations.push("resume_token", "is not a token this service issued");
                }
                cursor
            }
        };
        violations.check()?;

        let cursor = match cursor {
            Some(cursor) => cursor,
            None => FeedCursor::after(
                self.store()
                    .newest_event_id()
                    .await
                    .map_err(status::from_store)?,
            ),
        };
        let filter = EventFilter {
            user_id,
            feature,
            thresholds_only: request.thresholds_only,
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(feed(
            self.store().clone(),
            filter,
            cursor,
            tx,
            self.shutdown(),
        ));
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as EventStream
        ))
    }
}

/// Sends the events after `cursor` that pass `filter` until the watcher goes
/// away, the server shuts down (the stream then ends with UNAVAILABLE, and the
/// watcher resumes elsewhere with its last token) or the database fails.
async fn feed(
    store: Store,
    filter: EventFilter,
    mut cursor: FeedCursor,
    tx: mpsc::Sender<Result<proto::UsageEvent, Status>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let batch = match next_batch(&store, &filter, &mut cursor).await {
            Ok(batch) => batch,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let full = batch.ids_read == BATCH as usize;
        for event in batch.events {
            if tx.send(Ok(event)).await.is_err() {
                debug!("watcher went away");
                return;
            }
        }
        if full {
            continue;
        }
        let stopping = tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => false,
            _ = tx.closed() => return,
            stopping = shutdown.wait_for(|stopping| *stopping) => stopping.is_ok(),
        };
        if stopping {
            let status = Status::unavailable("server shutting down; resume with the last token");
            let _ = tx.send(Err(status)).await;
            return;
        }
    }
}

struct Batch {
    ids_read: usize,
    events: Vec<proto::UsageEvent>,
}

/// Reads the ids after the cursor, advances it, and loads the events that
/// pass the filter, each with the token that resumes just after it.
async fn next_batch(
    store: &Store,
    filter: &EventFilter,
    cursor: &mut FeedCursor,
) -> Result<Batch, Status> {
    let ids = store
        .event_ids(cursor.after, &cursor.missing_ids(), BATCH)
        .await
        .map_err(status::from_store)?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let steps = cursor.advance(&ids, now_ms);
    if steps.is_empty() {
        return Ok(Batch {
            ids_read: ids.len(),
            events: Vec::new(),
        });
    }

    let new_ids: Vec<i64> = steps.iter().map(|(id, _)| *id).collect();
    let stored = store
        .events_by_id(&new_ids, filter)
        .await
        .map_err(status::from_store)?;
    let mut tokens: std::collections::HashMap<i64, String> = steps.into_iter().collect();
    let events = stored
        .into_iter()
        .map(|event| {
            let token = tokens.remove(&event.id).unwrap_or_default();
            to_proto(event, token)
        })
        .collect();
    Ok(Batch {
        ids_read: ids.len(),
        events,
    })
}

fn to_proto(event: StoredEvent, resume_token: String) -> proto::UsageEvent {
    let (level_before, level_after) = event.levels.unwrap_or((0, 0));
    proto::UsageEvent {
        event_id: event.id,
        occurred_at: Some(event.occurred_at.into()),
        user_id: event.user_id,
        feature: event.feature,
        action: event.action,
        product_id: event.product_id,
        delta: event.delta,
        usage_before: event.usage_before,
        usage_after: event.usage_after,
        usage_limit: event.usage_limit,
        level_before: i32::from(level_before),
        level_after: i32::from(level_after),
        resume_token,
    }
}
