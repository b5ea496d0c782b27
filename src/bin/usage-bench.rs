//! `usage-bench`: drives a running usage-service over gRPC with many
//! concurrent calls from one process, prints throughput, latency percentiles
//! and the status-code mix, then checks the invariants in the database and
//! exits non-zero if they broke or if any call failed unexpectedly.
//!
//! Scenarios (one operation each):
//!
//! * `spread`: Reserve then Release of a fresh product for one of `--users`
//!   premium users chosen at random;
//! * `hot`: the same, always on the premium user `hot`;
//! * `refused`: Reserve of a fresh product for the Free user `full`, already
//!   at its limit (every call is refused);
//! * `get`: Get of a random premium user.
//!
//! Before the run it makes sure those users exist (idempotent), so it can be
//! pointed at an empty, migrated database.

use std::{
    collections::BTreeMap,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use tokio::time::MissedTickBehavior;
use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::Channel,
    Code, Request,
};
use usage_service::{
    config::DatabaseArgs,
    grpc::metered::code_name,
    proto::{usage_service_client::UsageServiceClient, GetRequest, ReleaseRequest, ReserveRequest},
    store::{self, Store},
};

/// The service's allocator: the load generator shares the CPUs with the
/// server and PostgreSQL, so its own calls should cost as little as theirs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for usage-service.
#[derive(Debug, Parser)]
#[command(name = "usage-bench", version, about)]
struct Args {
    /// gRPC address of the server under test.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,

    /// The server's database: users are prepared there and the invariants
    /// checked there at the end.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,

    /// What each operation does.
    #[arg(long, value_enum, default_value_t = Scenario::Spread)]
    scenario: Scenario,

    /// Operations in flight at once (one task each).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,

    /// How long to measure.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    duration: Duration,

    /// How long to run before measuring (connections and caches warm up).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,

    /// Operations per second across all tasks; unset runs flat out. Latency
    /// is then measured from each operation's scheduled start, so a stall
    /// counts against every operation it delays.
    #[arg(long)]
    rate: Option<f64>,

    /// Premium users of the `spread` and `get` scenarios, named `1`..`N`.
    #[arg(long, default_value_t = 100_000)]
    users: u32,

    /// HTTP/2 connections the tasks share. One, as a product service with
    /// one tonic `Channel` to this service would use.
    #[arg(long, default_value_t = 1)]
    connections: usize,

    /// Threads driving the calls. One is enough for tens of thousands of
    /// calls per second, and leaves the other CPUs to the server and the
    /// database when they share the machine (as pgbench's one or two).
    #[arg(long, default_value_t = 1)]
    threads: usize,

    /// Process id of the server, to report its peak resident memory.
    #[arg(long)]
    server_pid: Option<u32>,

    /// Bearer token sent with every call (role `service`), for a server with
    /// authentication on; mint one with `usage-service token`.
    #[arg(long, env = "USAGE_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Prepare the users and exit.
    #[arg(long)]
    setup_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Spread,
    Hot,
    Refused,
    Get,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Spread => "spread",
            Self::Hot => "hot",
            Self::Refused => "refused",
            Self::Get => "get",
        }
    }

    /// The only code a call of this scenario may end with.
    fn expected(self) -> Code {
        match self {
            Self::Refused => Code::ResourceExhausted,
            _ => Code::Ok,
        }
    }
}

/// The premium user every `hot` call goes to.
const HOT_USER: &str = "hot";
/// The Free user at its limit every `refused` call goes to.
const FULL_USER: &str = "full";
/// The Free tier's limit in the default schema.
const FREE_LIMIT: usize = 50;

/// What one task saw while measuring.
struct Tally {
    latency_us: Histogram<u64>,
    codes: BTreeMap<(&'static str, &'static str), u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("1 µs to 60 s at 3 significant figures is a valid histogram"),
            codes: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Self) {
        self.latency_us
            .add(other.latency_us)
            .expect("histograms of equal bounds merge");
        for (key, n) in other.codes {
            *self.codes.entry(key).or_default() += n;
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match args.threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    }
    .enable_all()
    .build()
    .expect("starting the tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("usage-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let store = Store::new(store::connect_pool(&DatabaseArgs {
        database_url: args.database_url.clone(),
        db_pool_size: 2,
        // The invariant check reads every user, which takes a while.
        db_statement_timeout: Duration::from_secs(600),
        ..DatabaseArgs::default()
    })?);
    let channels = connect(&args).await?;
    prepare(&store, &args, &channels[0]).await?;
    if args.setup_only {
        return Ok(ExitCode::SUCCESS);
    }

    let credentials = Credentials::new(args.token.as_deref())?;
    let (tally, measured, peak_rss_kib) = drive(&args, &channels, &credentials).await;
    let unexpected = report(&args, &tally, measured, peak_rss_kib);

    let discrepancies = store
        .check_invariants()
        .await
        .context("checking the invariants")?;
    if !discrepancies.is_empty() {
        eprintln!(
            "INVARIANT BROKEN for {} users (usage, ledger and audit disagree):",
            discrepancies.len()
        );
        for d in discrepancies.iter().take(20) {
            eprintln!("  {d:?}");
        }
        return Ok(ExitCode::from(2));
    }
    println!("invariants   hold: usage = slots = sum of audit deltas for every user");
    if unexpected > 0 {
        eprintln!(
            "FAILED: {unexpected} calls ended with a code other than {}",
            code_name(args.scenario.expected())
        );
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(args: &Args) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = Channel::from_shared(args.target.clone())
            .context("parsing --target")?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.target))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Creates the premium users `1`..`N` and `hot` with nothing held, and fills
/// the Free user `full` to its limit through the service.
///
/// The premium rows are written directly, in one statement, rather than by
/// 100,000 SetTier calls: a user with no slots and no audit rows satisfies
/// the invariant all the same.
async fn prepare(store: &Store, args: &Args, channel: &Channel) -> anyhow::Result<()> {
    let client = store
        .pool()
        .get()
        .await
        .context("connecting to the database")?;
    let users = i32::try_from(args.users).context("--users is too large")?;
    client
        .execute(
            "INSERT INTO user_tier_features (user_id, feature_name, tier, usage_limit)
             SELECT id, 'product_slot', 'premium', NULL
               FROM (SELECT g::text FROM generate_series(1, $1::int) AS g
                     UNION ALL SELECT $2::text) AS users (id)
             ON CONFLICT DO NOTHING",
            &[&users, &HOT_USER],
        )
        .await
        .context("creating the premium users")?;

    let mut service = UsageServiceClient::new(channel.clone());
    let credentials = Credentials::new(args.token.as_deref())?;
    for i in 0..FREE_LIMIT {
        let product_id = format!("full-{i}");
        service
            .reserve(credentials.request(
                ReserveRequest {
                    user_id: FULL_USER.into(),
                    product_id: product_id.clone(),
                    ..Default::default()
                },
                &product_id,
            ))
            .await
            .with_context(|| format!("filling the Free user {FULL_USER:?} to its limit"))?;
    }
    Ok(())
}

/// Runs the tasks for warm-up plus duration; returns what they measured, the
/// measured time and the server's peak resident memory.
async fn drive(
    args: &Args,
    channels: &[Channel],
    credentials: &Credentials,
) -> (Tally, Duration, Option<u64>) {
    let started = Instant::now();
    let measure_from = started + args.warmup;
    let measure_until = measure_from + args.duration;

    let rss = args.server_pid.map(|pid| {
        tokio::spawn(async move {
            let mut peak = 0;
            while Instant::now() < measure_until {
                if Instant::now() >= measure_from {
                    peak = peak.max(resident_kib(pid).unwrap_or(0));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        })
    });

    let tasks: Vec<_> = (0..args.concurrency)
        .map(|task| {
            let client = UsageServiceClient::new(channels[task % channels.len()].clone());
            let period = args
                .rate
                .map(|rate| Duration::from_secs_f64(args.concurrency as f64 / rate));
            let worker = Worker {
                task,
                client,
                credentials: credentials.clone(),
                scenario: args.scenario,
                users: args.users,
            };
            tokio::spawn(worker.run(period, measure_from, measure_until))
        })
        .collect();

    let mut tally = Tally::new();
    for task in tasks {
        tally.merge(task.await.expect("a bench task does not panic"));
    }
    let peak = match rss {
        Some(sampler) => sampler.await.ok(),
        None => None,
    };
    (tally, args.duration, peak)
}

/// One task of the load.
struct Worker {
    task: usize,
    client: UsageServiceClient<Channel>,
    credentials: Credentials,
    scenario: Scenario,
    users: u32,
}

impl Worker {
    async fn run(
        mut self,
        period: Option<Duration>,
        measure_from: Instant,
        measure_until: Instant,
    ) -> Tally {
        let mut tally = Tally::new();
        let mut pacer = period.map(|period| {
            // Staggered starts, so that paced tasks do not fire in step.
            let offset = period.mul_f64(fastrand::f64());
            let mut pacer = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            pacer.set_missed_tick_behavior(MissedTickBehavior::Burst);
            pacer
        });
        let mut seq: u64 = 0;
        loop {
            let scheduled = match pacer.as_mut() {
                Some(pacer) => pacer.tick().await.into_std(),
                None => Instant::now(),
            };
            if scheduled >= measure_until {
                return tally;
            }
            seq += 1;
            let codes = self.operation(seq).await;
            if scheduled >= measure_from {
                let micros = scheduled.elapsed().as_micros().max(1);
                tally
                    .latency_us
                    .saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
                for key in codes.into_iter().flatten() {
                    *tally.codes.entry(key).or_default() += 1;
                }
            }
        }
    }

    /// One operation of the scenario; the (rpc, code) of each call it made.
    async fn operation(&mut self, seq: u64) -> [Option<(&'static str, &'static str)>; 2] {
        let request_id = format!("bench-{}-{seq}", self.task);
        match self.scenario {
            Scenario::Spread | Scenario::Hot => {
                let user_id = match self.scenario {
                    Scenario::Hot => HOT_USER.to_owned(),
                    _ => fastrand::u32(1..=self.users).to_string(),
                };
                let product_id = request_id.clone();
                let reserved = self
                    .client
                    .reserve(self.credentials.request(
                        ReserveRequest {
                            user_id: user_id.clone(),
                            product_id: product_id.clone(),
                            ..Default::default()
                        },
                        &request_id,
                    ))
                    .await;
                let released = self
                    .client
                    .release(self.credentials.request(
                        ReleaseRequest {
                            user_id,
                            product_id,
                            ..Default::default()
                        },
                        &request_id,
                    ))
                    .await;
                [
                    Some(("Reserve", code_of(&reserved))),
                    Some(("Release", code_of(&released))),
                ]
            }
            Scenario::Refused => {
                let refused = self
                    .client
                    .reserve(self.credentials.request(
                        ReserveRequest {
                            user_id: FULL_USER.into(),
                            product_id: request_id.clone(),
                            ..Default::default()
                        },
                        &request_id,
                    ))
                    .await;
                [Some(("Reserve", code_of(&refused))), None]
            }
            Scenario::Get => {
                let got = self
                    .client
                    .get(self.credentials.request(
                        GetRequest {
                            user_id: fastrand::u32(1..=self.users).to_string(),
                            ..Default::default()
                        },
                        &request_id,
                    ))
                    .await;
                [Some(("Get", code_of(&got))), None]
            }
        }
    }
}

/// What every call carries: its request id, as a product service sends it,
/// and the bearer token when one is given.
#[derive(Clone)]
struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl Credentials {
    fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let authorization = token
            .map(|token| format!("Bearer {token}").parse())
            .transpose()
            .context("--token is not valid in a header")?;
        Ok(Self { authorization })
    }

    fn request<T>(&self, message: T, request_id: &str) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(
            "x-request-id",
            request_id
                .parse()
                .expect("a request id of ASCII letters, digits and dashes is valid metadata"),
        );
        if let Some(authorization) = &self.authorization {
            metadata.insert("authorization", authorization.clone());
        }
        request
    }
}

/// The canonical name of the call's status code.
fn code_of<T>(result: &Result<T, tonic::Status>) -> &'static str {
    code_name(match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    })
}

/// Prints the figures and a machine-readable `RESULT` line; returns how many
/// calls ended with a code the scenario does not expect.
fn report(args: &Args, tally: &Tally, measured: Duration, peak_rss_kib: Option<u64>) -> u64 {
    let h = &tally.latency_us;
    let ops = h.len();
    let secs = measured.as_secs_f64();
    let calls: u64 = tally.codes.values().sum();
    let ms = |micros: u64| micros as f64 / 1000.0;
    let (p50, p90, p99, max) = (
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
    );

    println!(
        "scenario     {} at concurrency {}{}, {secs:.1} s measured after {:.1} s warm-up, {} connections",
        args.scenario.name(),
        args.concurrency,
        args.rate.map_or_else(String::new, |r| format!(", paced at {r:.0} ops/s")),
        args.warmup.as_secs_f64(),
        args.connections
    );
    println!(
        "throughput   {:.1} ops/s ({:.1} calls/s; {ops} operations)",
        ops as f64 / secs,
        calls as f64 / secs
    );
    println!("latency ms   p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}  max {max:.2}");
    let mix: Vec<String> = tally
        .codes
        .iter()
        .map(|((rpc, code), n)| format!("{rpc} {code} {n}"))
        .collect();
    println!("status mix   {}", mix.join(", "));
    if let Some(kib) = peak_rss_kib {
        println!("server rss   peak {:.1} MiB", kib as f64 / 1024.0);
    }

    let expected = code_name(args.scenario.expected());
    let unexpected: u64 = tally
        .codes
        .iter()
        .filter(|((_, code), _)| *code != expected)
        .map(|(_, n)| n)
        .sum();
    println!(
        "RESULT scenario={} concurrency={} ops_per_s={:.1} p50_ms={p50:.2} p90_ms={p90:.2} p99_ms={p99:.2} max_ms={max:.2} unexpected={unexpected} rss_kib={}",
        args.scenario.name(),
        args.concurrency,
        ops as f64 / secs,
        peak_rss_kib.unwrap_or(0)
    );
    unexpected
}

/// `VmRSS` of a process, in KiB (Linux only).
fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
