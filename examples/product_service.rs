//! A small product service, playing the catalogue against the same database as
//! the usage service: the reference for how a caller keeps the two in step.
//!
//! * Create: take a slot first, then insert the product; if the insert fails,
//!   give the slot back.
//! * Delete: soft-delete the product first, then release its slot.
//! * Restore: take a slot first (as a restore), then clear `deleted_at`; if
//!   nothing was restored, give back a slot taken for it.
//!
//! The order matters. A slot is always taken before its product becomes live
//! and freed only after it stopped being live, so the limit is never exceeded,
//! and a crash in between leaves at worst a slot without a product: the
//! reconciliation releases it once it is older than the grace period.
//!
//! Every call carries the product service's bearer token (role `service`)
//! and an `x-request-id` naming the operation, which the audit trail keeps.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//! USAGE_ADDR=http://127.0.0.1:50051 \
//! USAGE_TOKEN=$(usage-service token --role service --sub catalogue) \
//!   cargo run --example product_service -- create alice "red bike"
//! ... -- delete alice 42
//! ... -- restore alice 42
//! ```
//!
//! The catalogue's schema is `tests/fixtures/catalogue.sql`.

use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::Channel,
    Code, Request, Status,
};
use usage_service::proto::{
    usage_service_client::UsageServiceClient, ReleaseRequest, ReserveAction, ReserveRequest,
};

/// Why a product operation did not happen.
#[derive(Debug)]
pub enum ProductError {
    /// The user is at its limit: release something or upgrade.
    LimitReached(Status),
    /// No such product of that user in the state the operation needs.
    NotFound,
    /// The usage service failed.
    Usage(Status),
    /// The catalogue's database failed.
    Database(tokio_postgres::Error),
}

impl std::fmt::Display for ProductError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LimitReached(status) => write!(f, "limit reached: {}", status.message()),
            Self::NotFound => f.write_str("no such product"),
            Self::Usage(status) => write!(f, "usage service: {status}"),
            Self::Database(err) => write!(f, "catalogue database: {err}"),
        }
    }
}

impl std::error::Error for ProductError {}

impl From<tokio_postgres::Error> for ProductError {
    fn from(err: tokio_postgres::Error) -> Self {
        Self::Database(err)
    }
}

impl From<Status> for ProductError {
    fn from(status: Status) -> Self {
        if status.code() == Code::ResourceExhausted {
            Self::LimitReached(status)
        } else {
            Self::Usage(status)
        }
    }
}

/// The catalogue's side: its database and a client of the usage service.
pub struct ProductService {
    db: tokio_postgres::Client,
    usage: UsageServiceClient<Channel>,
    authorization: Option<MetadataValue<Ascii>>,
}

impl ProductService {
    /// A service over an open catalogue connection and usage client.
    pub fn new(db: tokio_postgres::Client, usage: UsageServiceClient<Channel>) -> Self {
        Self {
            db,
            usage,
            authorization: None,
        }
    }

    /// The same service, presenting `token` on every call.
    pub fn with_token(self, token: &str) -> Result<Self, Box<dyn std::error::Error>> {
        Ok(Self {
            authorization: Some(format!("Bearer {token}").parse()?),
            ..self
        })
    }

    /// A request with the token and a request id saying what it is for.
    fn request<T>(&self, message: T, request_id: String) -> Request<T> {
        let mut request = Request::new(message);
        if let Ok(value) = request_id.parse() {
            request.metadata_mut().insert("x-request-id", value);
        }
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        request
    }

    /// Creates a product for `user_id` and returns its id.
    pub async fn create(&mut self, user_id: &str, name: &str) -> Result<i64, ProductError> {
        // The id is drawn first: the slot is taken in its name before the
        // product exists.
        let id: i64 = self
            .db
            .query_one(
                "SELECT nextval(pg_get_serial_sequence('products', 'id'))",
                &[],
            )
            .await?
            .get(0);
        self.reserve(user_id, id, ReserveAction::Add).await?;

        let inserted = self
            .db
            .execute(
                "INSERT INTO products (id, user_id, name) VALUES ($1, $2, $3)",
                &[&id, &user_id, &name],
            )
            .await;
        if let Err(err) = inserted {
            // The product will never exist: its slot must not stay taken. If
            // this release is lost too, reconciliation frees the slot later.
            self.release(user_id, id).await?;
            return Err(err.into());
        }
        Ok(id)
    }

    /// Soft-deletes a live product, then releases its slot.
    pub async fn delete(&mut self, user_id: &str, id: i64) -> Result<(), ProductError> {
        let deleted = self
            .db
            .execute(
                "UPDATE products SET deleted_at = now()
                  WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL",
                &[&id, &user_id],
            )
            .await?;
        if deleted == 0 {
            return Err(ProductError::NotFound);
        }
        self.release(user_id, id).await
    }

    /// Takes a slot for a deleted product, then makes it live again.
    pub async fn restore(&mut self, user_id: &str, id: i64) -> Result<(), ProductError> {
        let already_held = self.reserve(user_id, id, ReserveAction::Restore).await?;
        let restored = self
            .db
            .execute(
                "UPDATE products SET deleted_at = NULL
                  WHERE id = $1 AND user_id = $2 AND deleted_at IS NOT NULL",
                &[&id, &user_id],
            )
            .await;
        match restored {
            Ok(1) => Ok(()),
            outcome => {
                // Nothing was restored: give back the slot taken for it, but
                // never one the product already held while live.
                if !already_held {
                    self.release(user_id, id).await?;
                }
                outcome?;
                Err(ProductError::NotFound)
            }
        }
    }

    /// Reserves a slot; returns whether the product already held one.
    async fn reserve(
        &mut self,
        user_id: &str,
        id: i64,
        action: ReserveAction,
    ) -> Result<bool, ProductError> {
        let request = self.request(
            ReserveRequest {
                user_id: user_id.to_owned(),
                product_id: id.to_string(),
                feature: String::new(),
                action: action.into(),
                hold_ttl: None,
            },
            match action {
                ReserveAction::Restore => format!("catalogue-restore-{id}"),
                _ => format!("catalogue-create-{id}"),
            },
        );
        let response = self.usage.reserve(request).await?;
        Ok(response.into_inner().already_held)
    }

    async fn release(&mut self, user_id: &str, id: i64) -> Result<(), ProductError> {
        let request = self.request(
            ReleaseRequest {
                user_id: user_id.to_owned(),
                product_id: id.to_string(),
                feature: String::new(),
            },
            format!("catalogue-release-{id}"),
        );
        self.usage.release(request).await?;
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let usage_addr =
        std::env::var("USAGE_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".to_owned());

    let (db, connection) = tokio_postgres::connect(&database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let usage = UsageServiceClient::connect(usage_addr).await?;
    let mut service = ProductService::new(db, usage);
    if let Ok(token) = std::env::var("USAGE_TOKEN") {
        service = service.with_token(&token)?;
    }

    let parse_id = |s: &str| {
        s.parse::<i64>()
            .map_err(|e| format!("bad product id {s:?}: {e}"))
    };
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["create", user, name] => println!("created {}", service.create(user, name).await?),
        ["delete", user, id] => {
            service.delete(user, parse_id(id)?).await?;
            println!("deleted {id}");
        }
        ["restore", user, id] => {
            service.restore(user, parse_id(id)?).await?;
            println!("restored {id}");
        }
        _ => {
            return Err(
                "usage: product_service create USER NAME | delete USER ID | restore USER ID".into(),
            )
        }
    }
    Ok(())
}
