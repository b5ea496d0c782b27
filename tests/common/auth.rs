//! Authentication and TLS for tests: servers started with chosen options,
//! tokens good and bad, and TLS material generated at test time.

use std::{sync::Arc, time::Duration};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Request,
};
use usage_service::{
    auth::{Role, Verifier, VerifyingKey},
    grpc::tls::TlsOptions,
    proto::usage_service_client::UsageServiceClient,
    store::{self, Store},
    ServerOptions,
};

use super::{eventually, health_status, migrated_db, TestServer};

/// The HS256 secret of [`hs256_options`].
pub const SECRET: &[u8] = b"test-secret-0123456789-0123456789-abcdef";
/// The `iss` every test server requires.
pub const ISSUER: &str = "https://issuer.test";
/// The `aud` every test server requires.
pub const AUDIENCE: &str = "usage-service";

/// Options of a server checking HS256 tokens for [`ISSUER`] and [`AUDIENCE`],
/// remembering the tokens that passed, as the service does by default.
pub fn hs256_options() -> ServerOptions {
    let verifier = Verifier::new(
        &VerifyingKey::Secret(SECRET.to_vec()),
        Algorithm::HS256,
        Some(ISSUER),
        Some(AUDIENCE),
    )
    .expect("a valid test key")
    .remembering(64);
    with_verifier(verifier)
}

/// Options of a server checking tokens with `verifier`.
pub fn with_verifier(verifier: Verifier) -> ServerOptions {
    ServerOptions {
        auth: Some(Arc::new(verifier)),
        health_interval: Duration::from_millis(100),
        ..ServerOptions::default()
    }
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims valid for an hour, for [`ISSUER`] and [`AUDIENCE`].
pub fn claims(role: &str, sub: &str) -> Value {
    json!({
        "sub": sub,
        "role": role,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now(),
        "exp": now() + 3600,
    })
}

/// `claims` signed with `algorithm` and `key`.
pub fn sign(claims: &Value, algorithm: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), claims, key).expect("signing a test token")
}

/// `claims` signed HS256 with [`SECRET`].
pub fn sign_hs256(claims: &Value) -> String {
    let key = EncodingKey::from_secret(SECRET).expect("an HMAC key");
    sign(claims, Algorithm::HS256, &key)
}

/// A valid token for `role` and `sub`.
pub fn token(role: Role, sub: &str) -> String {
    sign_hs256(&claims(role.as_str(), sub))
}

/// An unsigned token (`alg: none`) carrying `claims`.
pub fn unsigned(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

/// `message` with `authorization: Bearer <token>` when a token is given.
pub fn authed<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        let value = MetadataValue::try_from(format!("Bearer {token}")).expect("ASCII token");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Freshly generated TLS material: an authority, a server certificate for
/// `localhost` and a client certificate, both signed by it.
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl Pki {
    /// Generates the material.
    pub fn generate(name: &str) -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test authority"));
        let ca_key = KeyPair::generate().expect("a CA key");
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("a CA certificate");

        let leaf = |san: &str| {
            let key = KeyPair::generate().expect("a key");
            let cert = CertificateParams::new(vec![san.to_owned()])
                .expect("leaf params")
                .signed_by(&key, &ca)
                .expect("a signed certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert_pem, server_key_pem) = leaf("localhost");
        let (client_cert_pem, client_key_pem) = leaf("client.test");
        Self {
            ca_pem: ca.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
        }
    }

    /// Server TLS; mutual when `require_client_cert`.
    pub fn server(&self, require_client_cert: bool) -> TlsOptions {
        TlsOptions {
            cert_pem: self.server_cert_pem.clone().into_bytes(),
            key_pem: self.server_key_pem.clone().into_bytes(),
            client_ca_pem: require_client_cert.then(|| self.ca_pem.clone().into_bytes()),
        }
    }

    /// Client TLS trusting this authority, without a client certificate.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost")
    }

    /// Client TLS presenting this authority's client certificate.
    pub fn client_with_cert(&self) -> ClientTlsConfig {
        self.client().identity(Identity::from_pem(
            &self.client_cert_pem,
            &self.client_key_pem,
        ))
    }
}

impl TestServer {
    /// A migrated fresh database and a plaintext server on it with `options`.
    pub async fn start_with_options(options: ServerOptions) -> Self {
        let server = Self::spawn_with_options(options).await;
        server.wait_until_serving().await;
        server
    }

    /// A migrated fresh database and a TLS server on it with `options`
    /// (whose `tls` must be set), waited for over a `client` connection.
    pub async fn start_tls(options: ServerOptions, client: ClientTlsConfig) -> Self {
        assert!(options.tls.is_some(), "a TLS server needs TLS options");
        let server = Self::spawn_with_options(options).await;
        let channel = server
            .tls_channel(client)
            .await
            .expect("connecting over TLS");
        eventually(Duration::from_secs(10), "the TLS server to serve", || {
            let channel = channel.clone();
            async move { health_status(channel, "").await == Some(1) }
        })
        .await;
        server
    }

    async fn spawn_with_options(options: ServerOptions) -> Self {
        let db = migrated_db().await;
        let args = db.args();
        let pool = store::connect_pool(&args).expect("building the pool");
        let store = Store::configured(pool, &args);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding port 0");
        let addr = listener.local_addr().expect("a bound address");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(usage_service::run(
            listener,
            store.clone(),
            options,
            async {
                rx.await.ok();
            },
        ));
        let checker =
            Store::new(store::connect_pool(&db.direct_args()).expect("building the pool"));
        Self {
            addr,
            db,
            store,
            checker,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A TLS channel to the server.
    pub async fn tls_channel(
        &self,
        config: ClientTlsConfig,
    ) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(format!("https://{}", self.addr))
            .expect("a valid URI")
            .tls_config(config)?
            .connect()
            .await
    }

    /// A usage client over a TLS channel.
    pub async fn tls_client(
        &self,
        config: ClientTlsConfig,
    ) -> Result<UsageServiceClient<Channel>, tonic::transport::Error> {
        Ok(UsageServiceClient::new(self.tls_channel(config).await?))
    }
}

/// How many rows the counters, the ledger and the audit trail hold; equal
/// before and after a call that wrote nothing.
pub async fn rows_written(sql: &tokio_postgres::Client) -> (i64, i64, i64) {
    let row = sql
        .query_one(
            "SELECT (SELECT count(*) FROM user_tier_features),
                    (SELECT count(*) FROM slots),
                    (SELECT count(*) FROM usage_events)",
            &[],
        )
        .await
        .expect("counting rows");
    (row.get(0), row.get(1), row.get(2))
}
