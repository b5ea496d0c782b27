//! Reminds operators, at start-up and every hour, that the server lets in
//! anyone who can reach its port.

use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

/// How often the warning is repeated.
pub const REPEAT_EVERY: Duration = Duration::from_secs(3600);

/// Logs the warning now and every `every` until `stop` changes.
pub async fn warn_periodically(every: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticks.tick() => warn!(
                "authentication is off: any caller can read and change every user's usage; \
                 serve with a JWT key (USAGE_AUTH_JWT_SECRET or USAGE_AUTH_JWT_PUBLIC_KEY) instead"
            ),
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Self;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// The warning is logged at once and again after each interval, until
    /// the job is stopped.
    #[tokio::test(start_paused = true)]
    async fn warns_at_start_and_every_interval() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let (stop, stopped) = watch::channel(false);
        let job = warn_periodically(REPEAT_EVERY, stopped);
        let clock = async {
            tokio::time::sleep(REPEAT_EVERY * 2 + Duration::from_secs(1)).await;
            stop.send(true).unwrap();
        };
        tokio::join!(job, clock);

        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("authentication is off").count(), 3, "{text}");
        assert!(text.contains("WARN"));
    }
}
