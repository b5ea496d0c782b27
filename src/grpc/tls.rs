//! TLS for the gRPC server, through rustls.

use std::fmt;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The server's certificate and key, and optionally the authority whose
/// client certificates are required (mutual TLS).
#[derive(Clone)]
pub struct TlsOptions {
    /// PEM certificate chain, the server's certificate first.
    pub cert_pem: Vec<u8>,
    /// PEM private key of that certificate.
    pub key_pem: Vec<u8>,
    /// PEM certificates of the authorities clients must present a
    /// certificate from; `None` accepts clients without one.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for TlsOptions {
    /// Says what is configured, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsOptions {
    /// The tonic configuration.
    pub fn server_config(&self) -> ServerTlsConfig {
        let config =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}
