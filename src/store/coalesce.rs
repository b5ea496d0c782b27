//! Calls that would only compete for PostgreSQL's CPUs and commits, sent
//! together as one statement.
//!
//! Calls are grouped into lanes by a key; the store uses one lane per kind
//! (Reserves and Releases of any users in one, Gets in another). At most
//! `per_lane` statements of a lane run at once. A call that finds its lane
//! below that runs alone, at once, as it would without this module, so a
//! lightly loaded service adds no wait and sends the plain single-call
//! statement. A call that finds its lane full joins the lane's queue; each
//! time one of the lane's statements ends, everything queued (up to
//! `max_batch` calls) goes to the database in one statement, and each call
//! gets its own answer back.
//!
//! Under load this trades one round trip, one statement and one commit per
//! call for one per batch. For a busy user that is the difference between
//! about one commit per WAL flush and one batch per flush; for many users,
//! PostgreSQL spends its CPU on the calls rather than on starting and
//! committing a transaction for each.
//!
//! A queued call that is cancelled, or that gives up after its wait bound,
//! leaves the queue and is never sent. Once sent, it is the database's: it
//! completes or fails with the rest of its batch, whatever its caller does.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    hash::Hash,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use tokio::sync::oneshot;

use super::StoreError;

/// One answer per item of a batch, in the items' order.
pub(crate) type Answers<A> = Vec<Result<A, StoreError>>;

/// How one kind of call is sent: a lane key, an item per call, an answer per
/// item.
pub(crate) trait Batch: Clone + Send + Sync + 'static {
    /// What groups calls into lanes.
    type Key: Eq + Hash + Clone + Send + Sync + 'static;
    /// One call.
    type Item: Send + 'static;
    /// What one call gets back.
    type Answer: Send + 'static;

    /// Sends `items` (at least one) of lane `key`, and gives each its answer
    /// through `replies` (by its position in `items`) as soon as it is
    /// known. An item left unanswered fails.
    fn run(
        &self,
        key: Self::Key,
        items: Vec<Self::Item>,
        replies: &Replies<Self::Answer>,
    ) -> impl Future<Output = ()> + Send;
}

type Reply<A> = oneshot::Sender<Result<A, StoreError>>;

/// Where the calls of a batch get their answers: each as soon as it is
/// known, so that a call answered early does not wait for the slowest of
/// its batch.
pub(crate) struct Replies<A> {
    senders: Mutex<Vec<Option<Reply<A>>>>,
}

impl<A> Replies<A> {
    fn new(senders: Vec<Reply<A>>) -> Self {
        Self {
            senders: Mutex::new(senders.into_iter().map(Some).collect()),
        }
    }

    /// Answers call `i` of the batch; a second answer for it is ignored,
    /// and so is a caller that has gone.
    pub(crate) fn send(&self, i: usize, answer: Result<A, StoreError>) {
        let sender = self
            .senders
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get_mut(i)
            .and_then(Option::take);
        if let Some(sender) = sender {
            let _ = sender.send(answer);
        }
    }

    /// Answers the calls of the batch in order, one answer each.
    pub(crate) fn send_all(&self, answers: Answers<A>) {
        for (i, answer) in answers.into_iter().enumerate() {
            self.send(i, answer);
        }
    }
}

/// The lanes of one kind of call.
pub(crate) struct Coalescer<B: Batch> {
    /// The kind of call, as the metrics name it.
    kind: &'static str,
    lanes: Mutex<Lanes<B>>,
    per_lane: usize,
    max_batch: usize,
    next_id: AtomicU64,
}

type Lanes<B> = HashMap<<B as Batch>::Key, Lane<B>>;

struct Lane<B: Batch> {
    /// Statements of this lane running now.
    running: usize,
    queue: VecDeque<Queued<B>>,
}

impl<B: Batch> Default for Lane<B> {
    fn default() -> Self {
        Self {
            running: 0,
            queue: VecDeque::new(),
        }
    }
}

struct Queued<B: Batch> {
    id: u64,
    item: B::Item,
    answer: Reply<B::Answer>,
}

impl<B: Batch> Coalescer<B> {
    /// Lanes for calls of `kind`, running at most `per_lane` statements
    /// each, of at most `max_batch` calls.
    pub(crate) fn new(kind: &'static str, per_lane: usize, max_batch: usize) -> Self {
        assert!(per_lane > 0 && max_batch > 0, "a lane must be able to run");
        Self {
            kind,
            lanes: Mutex::new(HashMap::new()),
            per_lane,
            max_batch,
            next_id: AtomicU64::new(0),
        }
    }

    /// Runs `item` in lane `key`: alone if the lane has room, else with the
    /// calls queued beside it once a statement of the lane ends. A queued
    /// call waits at most `wait` (no bound when `None`) to be sent, then
    /// fails with [`StoreError::Unavailable`], unsent.
    ///
    /// `batch` sends the call, and the batches this call's turn passes on.
    pub(crate) async fn submit(
        self: &Arc<Self>,
        batch: &B,
        key: B::Key,
        item: B::Item,
        wait: Option<Duration>,
    ) -> Result<B::Answer, StoreError> {
        let (answer, answered) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let Some((item, answer)) = self.enter(&key, id, item, answer) else {
            return self.queued(&key, id, answered, wait).await;
        };
        // Held while the call runs; if the call is dropped half-way, the
        // turn still passes to the queue.
        let turn = Turn {
            coalescer: Arc::clone(self),
            key: key.clone(),
            batch: batch.clone(),
        };
        let replies = Replies::new(vec![answer]);
        batch.run(key, vec![item], &replies).await;
        drop((replies, turn));
        answered.await.unwrap_or_else(|_| Err(missing_answer()))
    }

    /// Takes a running place in the lane of `key` and hands `item` and its
    /// `answer` back, or, with the lane full, queues them and returns `None`.
    fn enter(
        &self,
        key: &B::Key,
        id: u64,
        item: B::Item,
        answer: Reply<B::Answer>,
    ) -> Option<(B::Item, Reply<B::Answer>)> {
        let mut lanes = self.lock();
        let lane = lanes.entry(key.clone()).or_default();
        if lane.running < self.per_lane {
            lane.running += 1;
            return Some((item, answer));
        }
        lane.queue.push_back(Queued { id, item, answer });
        crate::metrics::add_queued(self.kind, 1);
        None
    }

    /// Waits for the answer of queued call `id`, giving up after `wait` if it
    /// has not been sent by then.
    async fn queued(
        &self,
        key: &B::Key,
        id: u64,
        mut answered: oneshot::Receiver<Result<B::Answer, StoreError>>,
        wait: Option<Duration>,
    ) -> Result<B::Answer, StoreError> {
        let answer = match wait {
            None => answered.await,
            Some(wait) => match tokio::time::timeout(wait, &mut answered).await {
                Ok(answer) => answer,
                Err(_) if self.withdraw(key, id) => {
                    return Err(StoreError::Unavailable(format!(
                        "the calls ahead of this one kept the database busy for {wait:?}; try again"
                    )))
                }
                // Already sent: its answer is on the way.
                Err(_) => answered.await,
            },
        };
        answer.unwrap_or_else(|_| Err(missing_answer()))
    }

    fn lock(&self) -> MutexGuard<'_, Lanes<B>> {
        // A panic elsewhere cannot leave a lane half-updated: every change is
        // a single step under the lock.
        self.lanes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes call `id` out of the queue of `key`; false if it was already sent.
    fn withdraw(&self, key: &B::Key, id: u64) -> bool {
        let mut lanes = self.lock();
        let Some(lane) = lanes.get_mut(key) else {
            return false;
        };
        let before = lane.queue.len();
        lane.queue.retain(|queued| queued.id != id);
        let withdrawn = lane.queue.len() < before;
        if withdrawn {
            crate::metrics::add_queued(self.kind, -1);
        }
        withdrawn
    }

    /// Ends one running statement of `key`: the queued calls whose callers
    /// still wait become the lane's next batch, or the lane has one
    /// statement fewer running.
    fn next_batch(&self, key: &B::Key) -> Option<Vec<Queued<B>>> {
        let mut lanes = self.lock();
        let lane = lanes.get_mut(key)?;
        let mut batch = Vec::new();
        let mut left = 0;
        while batch.len() < self.max_batch {
            let Some(queued) = lane.queue.pop_front() else {
                break;
            };
            left += 1;
            if !queued.answer.is_closed() {
                batch.push(queued);
            }
        }
        crate::metrics::add_queued(self.kind, -left);
        if batch.is_empty() {
            lane.running -= 1;
            if lane.running == 0 && lane.queue.is_empty() {
                lanes.remove(key);
            }
            return None;
        }
        Some(batch)
    }

    /// Number of lanes with a call running or queued.
    #[cfg(test)]
    fn lanes(&self) -> usize {
        self.lock().len()
    }
}

/// The right to run one statement of a lane. When it is dropped, the lane's
/// queue is sent in a task of its own, which carries the turn on.
struct Turn<B: Batch> {
    coalescer: Arc<Coalescer<B>>,
    key: B::Key,
    batch: B,
}

impl<B: Batch> Drop for Turn<B> {
    fn drop(&mut self) {
        let Some(queued) = self.coalescer.next_batch(&self.key) else {
            return;
        };
        let turn = Turn {
            coalescer: Arc::clone(&self.coalescer),
            key: self.key.clone(),
            batch: self.batch.clone(),
        };
        // Outside a runtime (one shutting down) the queued calls are
        // dropped unsent, and their callers get an error.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let (items, senders): (Vec<_>, Vec<_>) = queued
                .into_iter()
                .map(|queued| (queued.item, queued.answer))
                .unzip();
            let replies = Replies::new(senders);
            turn.batch.run(turn.key.clone(), items, &replies).await;
            drop((replies, turn));
        });
    }
}

fn missing_answer() -> StoreError {
    StoreError::UnexpectedOutcome("a coalesced call got no answer".to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::Notify;

    use super::*;

    /// Records each batch's items and answers each item with itself, each
    /// batch once `gate` lets it through.
    #[derive(Clone, Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        gate: Arc<Notify>,
        started: Arc<AtomicUsize>,
    }

    impl Batch for Recorder {
        type Key = &'static str;
        type Item = u32;
        type Answer = u32;

        async fn run(&self, _key: &'static str, items: Vec<u32>, replies: &Replies<u32>) {
            self.started.fetch_add(1, Ordering::SeqCst);
            self.gate.notified().await;
            self.batches.lock().unwrap().push(items.clone());
            replies.send_all(items.into_iter().map(Ok).collect());
        }
    }

    impl Recorder {
        fn batches(&self) -> Vec<Vec<u32>> {
            self.batches.lock().unwrap().clone()
        }

        fn started(&self) -> usize {
            self.started.load(Ordering::SeqCst)
        }

        /// Submits `item` to lane `key` in a task of its own.
        fn call(
            &self,
            coalescer: &Arc<Coalescer<Self>>,
            key: &'static str,
            item: u32,
            wait: Option<Duration>,
        ) -> tokio::task::JoinHandle<Result<u32, StoreError>> {
            let (coalescer, recorder) = (coalescer.clone(), self.clone());
            tokio::spawn(async move { coalescer.submit(&recorder, key, item, wait).await })
        }
    }

    async fn until(what: impl Fn() -> bool) {
        for _ in 0..1000 {
            if what() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("condition not reached");
    }

    /// While the lane's one statement runs, later calls queue; they then go
    /// as one batch, in arrival order, each with its own answer.
    #[tokio::test]
    async fn queued_calls_go_together_in_order() {
        let coalescer = Arc::new(Coalescer::new("test", 1, 100));
        let recorder = Recorder::default();
        let first = recorder.call(&coalescer, "alice", 0, None);
        until(|| recorder.started() == 1).await;

        let mut queued = Vec::new();
        for n in 1..=5 {
            queued.push(recorder.call(&coalescer, "alice", n, None));
            // Let the call reach the queue before the next one is made.
            tokio::task::yield_now().await;
        }
        until(|| queue_len(&coalescer, "alice") == 5).await;

        recorder.gate.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 0);
        until(|| recorder.started() == 2).await;
        recorder.gate.notify_one();
        for (n, call) in (1..=5).zip(queued) {
            assert_eq!(call.await.unwrap().unwrap(), n);
        }
        assert_eq!(recorder.batches(), vec![vec![0], vec![1, 2, 3, 4, 5]]);
        until(|| coalescer.lanes() == 0).await;
    }

    /// A queued call that gives up is never sent; another lane is not held
    /// up by a busy one.
    #[tokio::test]
    async fn a_call_that_gives_up_is_not_sent() {
        let coalescer = Arc::new(Coalescer::new("test", 1, 100));
        let recorder = Recorder::default();
        let first = recorder.call(&coalescer, "alice", 0, None);
        until(|| recorder.started() == 1).await;

        let short = Some(Duration::from_millis(20));
        let err = recorder
            .call(&coalescer, "alice", 1, short)
            .await
            .unwrap()
            .expect_err("alice's lane is busy");
        assert!(err.is_unavailable(), "{err}");

        let other = recorder.call(&coalescer, "bob", 7, short);
        until(|| recorder.started() == 2).await;
        recorder.gate.notify_one();
        recorder.gate.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 0);
        assert_eq!(other.await.unwrap().unwrap(), 7);
        until(|| coalescer.lanes() == 0).await;
        let mut batches = recorder.batches();
        batches.sort();
        assert_eq!(
            batches,
            vec![vec![0], vec![7]],
            "the call that gave up was sent"
        );
    }

    /// A call cancelled while running still hands its turn on, so the calls
    /// queued behind it are sent.
    #[tokio::test]
    async fn a_cancelled_call_hands_its_turn_on() {
        let coalescer = Arc::new(Coalescer::new("test", 1, 100));
        let recorder = Recorder::default();
        let first = recorder.call(&coalescer, "alice", 0, None);
        until(|| recorder.started() == 1).await;
        let second = recorder.call(&coalescer, "alice", 1, None);
        until(|| queue_len(&coalescer, "alice") == 1).await;

        first.abort();
        until(|| recorder.started() == 2).await;
        recorder.gate.notify_one();
        assert_eq!(second.await.unwrap().unwrap(), 1);
        assert_eq!(recorder.batches(), vec![vec![1]]);
        until(|| coalescer.lanes() == 0).await;
    }

    /// A queued call whose caller goes away is left out of the batch.
    #[tokio::test]
    async fn a_dropped_queued_call_is_not_sent() {
        let coalescer = Arc::new(Coalescer::new("test", 1, 100));
        let recorder = Recorder::default();
        let first = recorder.call(&coalescer, "alice", 0, None);
        until(|| recorder.started() == 1).await;
        let dropped = recorder.call(&coalescer, "alice", 1, None);
        let kept = recorder.call(&coalescer, "alice", 2, None);
        until(|| queue_len(&coalescer, "alice") == 2).await;

        dropped.abort();
        let _ = dropped.await;
        recorder.gate.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 0);
        until(|| recorder.started() == 2).await;
        recorder.gate.notify_one();
        assert_eq!(kept.await.unwrap().unwrap(), 2);
        assert_eq!(recorder.batches(), vec![vec![0], vec![2]]);
    }

    /// No batch is larger than `max_batch`.
    #[tokio::test]
    async fn batches_are_bounded() {
        let coalescer = Arc::new(Coalescer::new("test", 1, 2));
        let recorder = Recorder::default();
        let mut calls = vec![recorder.call(&coalescer, "alice", 0, None)];
        until(|| recorder.started() == 1).await;
        for n in 1..=5 {
            calls.push(recorder.call(&coalescer, "alice", n, None));
            tokio::task::yield_now().await;
        }
        until(|| queue_len(&coalescer, "alice") == 5).await;
        for started in 1..=4 {
            until(|| recorder.started() == started).await;
            recorder.gate.notify_one();
        }
        for (n, call) in (0..).zip(calls) {
            assert_eq!(call.await.unwrap().unwrap(), n);
        }
        assert_eq!(
            recorder.batches(),
            vec![vec![0], vec![1, 2], vec![3, 4], vec![5]]
        );
    }

    fn queue_len(coalescer: &Coalescer<Recorder>, key: &'static str) -> usize {
        coalescer.lock().get(key).map_or(0, |lane| lane.queue.len())
    }
}
