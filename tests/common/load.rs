//! A small bounded load for fault tests: concurrent tasks that Reserve and
//! Release products of a few users while a fault is injected, recording what
//! each answer proves in a [`History`].
//!
//! Each task owns its products (`t<task>-p<n>`, for every user), so calls for
//! one product never overlap and the per-product reasoning of [`History`]
//! holds; users are shared, so tasks contend on the users' rows and on the
//! Free limit.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;
use tonic::{transport::Channel, Code, Request};
use usage_service::{
    proto::{usage_service_client::UsageServiceClient, ReleaseRequest, ReserveRequest},
    usage::history::{CallKind, CallResult, History, SlotState},
};

/// What the load does.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The users whose products are reserved and released.
    pub users: Vec<String>,
    /// Concurrent tasks, each with at most one call in flight.
    pub tasks: usize,
    /// Products of each user owned by one task.
    pub products_per_task: usize,
    /// Deadline of each call, sent to the server and enforced by the client.
    pub deadline: Duration,
    /// Calls each task makes before it stops (unless stopped earlier).
    pub calls_per_task: usize,
    /// Attempts of one call on `UNAVAILABLE` or a transport error, each on
    /// the next client: what a product service does with an idempotent call.
    pub attempts: usize,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            users: (0..4).map(|i| format!("user-{i}")).collect(),
            tasks: 8,
            products_per_task: 10,
            deadline: Duration::from_secs(2),
            calls_per_task: 10_000,
            attempts: 1,
        }
    }
}

/// One call as the client saw it.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub user_id: String,
    pub product_id: String,
    pub kind: CallKind,
    /// Which client (server) the call went to.
    pub client: usize,
    pub started: Instant,
    pub finished: Instant,
    /// `None` when the call succeeded.
    pub code: Option<Code>,
    pub message: String,
}

impl CallRecord {
    /// What the answer proves about the product.
    pub fn result(&self) -> CallResult {
        classify(self.code)
    }
}

/// What a finished load did.
pub struct LoadReport {
    pub history: History,
    pub calls: Vec<CallRecord>,
}

impl LoadReport {
    /// Calls that answered with `code` (`None`: succeeded).
    pub fn count(&self, code: Option<Code>) -> usize {
        self.calls.iter().filter(|c| c.code == code).count()
    }

    /// A one-line summary for the test's output.
    pub fn summary(&self) -> String {
        let (held, free, unknown) = self.history.tally();
        let mut codes = std::collections::BTreeMap::<String, usize>::new();
        for call in &self.calls {
            let key = call.code.map_or("OK".to_owned(), |c| format!("{c:?}"));
            *codes.entry(key).or_default() += 1;
        }
        format!(
            "{} calls {codes:?}; products held {held}, free {free}, unknown {unknown}",
            self.calls.len()
        )
    }
}

/// A load running in the background.
pub struct Load {
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    succeeded: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Vec<CallRecord>>>,
}

impl Load {
    /// Starts `spec.tasks` tasks spreading their calls over `clients`.
    pub fn start(spec: LoadSpec, clients: Vec<UsageServiceClient<Channel>>) -> Self {
        assert!(!clients.is_empty(), "a load needs a client");
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let succeeded = Arc::new(AtomicU64::new(0));
        let tasks = (0..spec.tasks)
            .map(|task| {
                let worker = Worker {
                    task,
                    spec: spec.clone(),
                    clients: clients.clone(),
                    stop: stop.clone(),
                    completed: completed.clone(),
                    succeeded: succeeded.clone(),
                };
                tokio::spawn(worker.run())
            })
            .collect();
        Self {
            stop,
            completed,
            succeeded,
            tasks,
        }
    }

    /// Calls answered so far, whatever the answer.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }

    /// Calls answered OK so far.
    pub fn succeeded(&self) -> u64 {
        self.succeeded.load(Ordering::SeqCst)
    }

    /// Waits until `n` more calls than now have succeeded, failing the test
    /// after `timeout`.
    pub async fn wait_for_successes(&self, n: u64, timeout: Duration) {
        let target = self.succeeded() + n;
        super::eventually(timeout, &format!("{n} successful calls"), || async {
            self.succeeded() >= target
        })
        .await;
    }

    /// Asks every task to stop after its current call.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Stops the load and returns what it did.
    pub async fn finish(self) -> LoadReport {
        self.stop();
        self.join().await
    }

    /// Waits for every task to end on its own (bounded by `calls_per_task`).
    pub async fn join(self) -> LoadReport {
        let mut history = History::new();
        let mut calls = Vec::new();
        for task in self.tasks {
            let records = task.await.expect("a load task does not panic");
            for record in &records {
                history.record(
                    &record.user_id,
                    &record.product_id,
                    record.kind,
                    record.result(),
                );
            }
            calls.extend(records);
        }
        LoadReport { history, calls }
    }
}

/// Whether an answer proves the call applied, proves it did not, or neither.
pub fn classify(code: Option<Code>) -> CallResult {
    match code {
        None => CallResult::Acknowledged,
        Some(Code::ResourceExhausted | Code::InvalidArgument | Code::PermissionDenied) => {
            CallResult::Refused
        }
        Some(_) => CallResult::Unknown,
    }
}

/// Whether a failed call may be retried on another server.
fn retryable(code: Option<Code>) -> bool {
    matches!(code, Some(Code::Unavailable | Code::Unknown))
}

struct Worker {
    task: usize,
    spec: LoadSpec,
    clients: Vec<UsageServiceClient<Channel>>,
    stop: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    succeeded: Arc<AtomicU64>,
}

impl Worker {
    async fn run(self) -> Vec<CallRecord> {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ ((self.task as u64 + 1) * 0x1000_0001));
        let mut history = History::new();
        let mut records = Vec::new();
        let mut next_client = self.task;

        for _ in 0..self.spec.calls_per_task {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let user_id = self.spec.users[rng.below(self.spec.users.len())].clone();
            let product_id = format!("t{}-p{}", self.task, rng.below(self.spec.products_per_task));
            let kind = match history.state(&user_id, &product_id) {
                SlotState::Held => CallKind::Release,
                SlotState::Free => CallKind::Reserve,
                SlotState::Unknown if rng.below(2) == 0 => CallKind::Reserve,
                SlotState::Unknown => CallKind::Release,
            };

            let mut failed = false;
            for attempt in 0..self.spec.attempts.max(1) {
                let client = next_client % self.clients.len();
                next_client += 1;
                let record = self.call(client, &user_id, &product_id, kind).await;
                history.record(&user_id, &product_id, kind, record.result());
                self.completed.fetch_add(1, Ordering::SeqCst);
                if record.code.is_none() {
                    self.succeeded.fetch_add(1, Ordering::SeqCst);
                }
                failed = retryable(record.code);
                let retry = failed && attempt + 1 < self.spec.attempts;
                records.push(record);
                if !retry || self.stop.load(Ordering::SeqCst) {
                    break;
                }
                // A client backs off before retrying, as product services do.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if failed {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        records
    }

    async fn call(
        &self,
        client: usize,
        user_id: &str,
        product_id: &str,
        kind: CallKind,
    ) -> CallRecord {
        let mut grpc = self.clients[client].clone();
        let deadline = self.spec.deadline;
        let started = Instant::now();
        let answer = async {
            match kind {
                CallKind::Reserve => {
                    let mut request = Request::new(ReserveRequest {
                        user_id: user_id.to_owned(),
                        product_id: product_id.to_owned(),
                        ..Default::default()
                    });
                    request.set_timeout(deadline);
                    grpc.reserve(request).await.map(drop)
                }
                CallKind::Release => {
                    let mut request = Request::new(ReleaseRequest {
                        user_id: user_id.to_owned(),
                        product_id: product_id.to_owned(),
                        ..Default::default()
                    });
                    request.set_timeout(deadline);
                    grpc.release(request).await.map(drop)
                }
            }
        };
        // The server enforces the deadline it was sent; the client's own
        // timer, 2 s later, covers a server that cannot answer at all.
        let outcome = tokio::time::timeout(deadline + Duration::from_secs(2), answer).await;
        let (code, message) = match outcome {
            Ok(Ok(())) => (None, String::new()),
            Ok(Err(status)) => (Some(status.code()), status.message().to_owned()),
            Err(_) => (
                Some(Code::DeadlineExceeded),
                "client-side deadline".to_owned(),
            ),
        };
        CallRecord {
            user_id: user_id.to_owned(),
            product_id: product_id.to_owned(),
            kind,
            client,
            started,
            finished: Instant::now(),
            code,
            message,
        }
    }
}

/// A tiny deterministic generator: the load needs spread, not quality.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}
