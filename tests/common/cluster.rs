//! A throwaway PostgreSQL cluster of the test's own, for faults that need the
//! whole server: restarts and crashes.
//!
//! `initdb` and `postgres` refuse to run as root, so as root they run as the
//! `postgres` OS user. Binaries come from `USAGE_TEST_PG_BINDIR`, or the
//! newest `/usr/lib/postgresql/*/bin`.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
};

/// A cluster in a temporary directory, stopped and deleted on drop.
pub struct Cluster {
    dir: PathBuf,
    bindir: PathBuf,
    pub port: u16,
}

impl Cluster {
    /// Creates and starts a cluster on a free port of 127.0.0.1. Blocking.
    pub fn start() -> Self {
        let bindir = bindir();
        let dir = std::env::temp_dir().join(format!(
            "usage-pgtest-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("the clock is after 1970")
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).expect("creating the cluster directory");
        if running_as_root() {
            run(Command::new("chown").arg("postgres").arg(&dir));
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let cluster = Self { dir, bindir, port };
        run(cluster
            .command("initdb")
            .arg("-D")
            .arg(cluster.data())
            .args(["-U", "postgres", "-A", "trust", "--no-sync"]));
        cluster.pg_ctl(&["start", "-w"]);
        cluster
    }

    /// The URL of database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// `pg_ctl restart -m immediate`: every backend killed without a
    /// checkpoint, crash recovery on start. Blocking; returns once the
    /// server accepts connections again.
    pub fn restart_immediate(&self) {
        self.pg_ctl(&["restart", "-m", "immediate", "-w"]);
    }

    /// Stops the server at once, as a crash would. Blocking.
    pub fn stop_immediate(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    }

    /// Starts the server again after [`Cluster::stop_immediate`]. Blocking.
    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w"]);
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_ctl(&self, args: &[&str]) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.display()
        );
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .arg("-o")
            .arg(options)
            .args(args));
    }

    fn command(&self, program: &str) -> Command {
        let binary = self.bindir.join(program);
        if running_as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(binary);
            command
        } else {
            Command::new(binary)
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["stop", "-m", "immediate"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("USAGE_TEST_PG_BINDIR") {
        return dir.into();
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql")
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|dir| Path::new(dir).join("initdb").exists())
        .collect();
    dirs.sort_by_key(|dir| {
        dir.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("running {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
