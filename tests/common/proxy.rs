//! A TCP proxy between the service and PostgreSQL, so that tests can make the
//! database disappear, come back, or answer slowly, without touching the real
//! server.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::broadcast,
};

/// Forwards connections to `upstream` while up; when down, cuts every open
/// connection and refuses new ones. Every chunk PostgreSQL sends back can be
/// held for a configurable delay.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    cut: broadcast::Sender<()>,
}

impl Proxy {
    /// Starts a proxy on `127.0.0.1:0` to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().expect("a bound address");
        let up = Arc::new(AtomicBool::new(true));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (cut, _) = broadcast::channel(1);
        let (task_up, task_cut, task_delay) = (up.clone(), cut.clone(), delay_ms.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !task_up.load(Ordering::SeqCst) {
                    continue; // dropping the socket refuses the connection
                }
                let mut cut = task_cut.subscribe();
                let delay_ms = task_delay.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = forward(inbound, outbound, delay_ms) => {}
                        _ = cut.recv() => {}
                    }
                });
            }
        });
        Self {
            addr,
            up,
            delay_ms,
            cut,
        }
    }

    /// Cuts every connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let _ = self.cut.send(());
    }

    /// Accepts connections again.
    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Holds every chunk from PostgreSQL for `delay` before passing it on
    /// (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

/// Copies both ways until either side closes, delaying the answers.
async fn forward(inbound: TcpStream, outbound: TcpStream, delay_ms: Arc<AtomicU64>) {
    let (mut client_read, mut client_write) = inbound.into_split();
    let (mut server_read, mut server_write) = outbound.into_split();
    let requests = tokio::io::copy(&mut client_read, &mut server_write);
    let answers = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let delay = delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = requests => {}
        _ = answers => {}
    }
}
