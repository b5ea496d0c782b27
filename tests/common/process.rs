//! The real `usage-service` binary in a child process, for faults that need
//! a process: SIGTERM, several replicas on one database.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use tonic::transport::Channel;
use usage_service::proto::usage_service_client::UsageServiceClient;

/// A server process listening on a port of 127.0.0.1 it chose itself.
pub struct ServerProcess {
    pub addr: SocketAddr,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// Spawns `usage-service serve` on `database_url` (already migrated) and
    /// waits until it listens.
    pub fn spawn(database_url: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_usage-service"))
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("USAGE_LISTEN_ADDR", "127.0.0.1:0")
            .env("USAGE_METRICS_ADDR", "127.0.0.1:0")
            .env("USAGE_NO_MIGRATE", "true")
            .env("USAGE_AUTH", "none")
            .env("USAGE_NO_CATALOGUE", "true")
            .env("USAGE_HEALTH_INTERVAL", "100ms")
            .env("USAGE_DB_POOL_SIZE", "16")
            .env("USAGE_WORKER_THREADS", "2")
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning usage-service");

        // The log is drained for the whole life of the process, or a full
        // pipe would block the server.
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = listen_addr(&line) {
                    let _ = tx.send(addr);
                }
                lines
                    .lock()
                    .expect("the log lock is not poisoned")
                    .push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("usage-service did not start: {:#?}", log.lock().unwrap()));
        Self { addr, child, log }
    }

    /// A client of this process.
    pub async fn client(&self) -> UsageServiceClient<Channel> {
        UsageServiceClient::new(self.channel().await)
    }

    /// A channel to this process.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("a valid URI")
            .connect()
            .await
            .expect("connecting to the server process")
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the server process") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not exit within {timeout:?}: {:#?}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The log lines written so far.
    pub fn log(&self) -> Vec<String> {
        self.log
            .lock()
            .expect("the log lock is not poisoned")
            .clone()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "log of the server at {}:\n{}",
                self.addr,
                self.log().join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in the `serving gRPC local_addr=...` start-up line.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("serving gRPC") {
        return None;
    }
    let rest = line.split("local_addr=").nth(1)?;
    rest.split(|c: char| c.is_whitespace() || c == '\u{1b}')
        .next()?
        .parse()
        .ok()
}
