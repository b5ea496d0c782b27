//! Reading the service's Prometheus endpoint in tests.

use std::{collections::BTreeMap, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// A loopback address nothing listens on right now.
pub fn free_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("binding port 0");
    probe.local_addr().expect("a bound address")
}

/// The text of `GET /metrics`, after checking the response is a 200.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connecting to /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
        .await
        .expect("sending the scrape request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("reading the scrape response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response with a body");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}

/// Parsed samples: (name, labels) -> value.
pub struct Samples(BTreeMap<(String, BTreeMap<String, String>), f64>);

impl Samples {
    pub fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').expect("a label pair");
                    (key.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            let value = value.parse().expect("a numeric sample");
            samples.insert((name.to_owned(), labels), value);
        }
        Self(samples)
    }

    /// The sample with exactly these labels; 0 when absent (never recorded).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.0
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }
}

/// How far each sample moved between two scrapes.
pub struct Delta {
    pub before: Samples,
    pub after: Samples,
}

impl Delta {
    pub fn of(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.after.get(name, labels) - self.before.get(name, labels)
    }
}
