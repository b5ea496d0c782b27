//! The gate every call passes before it reaches a handler: who is calling,
//! whether they may call this method, and whether the server takes the call
//! at all (deadline, concurrency, size).
//!
//! Each check costs less than the next and none touches the database, so a
//! refused call has written nothing:
//!
//! 1. The method's [`Access`]: health (and reflection unless configured
//!    otherwise) pass straight through.
//! 2. The bearer token, then the role against the method's row in
//!    [`policy`](super::policy): `UNAUTHENTICATED` or `PERMISSION_DENIED`.
//! 3. The caller's `grpc-timeout`: a call whose deadline has already passed
//!    is answered `DEADLINE_EXCEEDED` without being started.
//! 4. A permit from the server-wide bound on calls in flight: when none is
//!    free the call fails at once with `UNAVAILABLE` instead of queueing.
//! 5. The request body, read up to the largest message accepted:
//!    `RESOURCE_EXHAUSTED` beyond it.
//!
//! The caller's identity is then available to the handler through
//! [`authenticated`] for the duration of the call.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{body::Body, Status};
use tower::{Layer, Service};
use tracing::{debug, info};

use super::policy::{Access, Policy};
use crate::auth::{AuthError, Identity, Verifier};

tokio::task_local! {
    static CALLER: Identity;
}

/// The identity the gate authenticated for the call being handled; `None`
/// when authentication is turned off or outside a call.
pub fn authenticated() -> Option<Identity> {
    CALLER.try_with(Clone::clone).ok()
}

/// Length of the gRPC frame header before each message.
const FRAME_HEADER_BYTES: usize = 5;

/// Methods whose requests are single messages, read whole by the gate. Every
/// RPC of `usage.v1` is unary; a streaming one would need its own limit.
const UNARY_PREFIX: &str = "/usage.v1.";

/// What the gate enforces.
#[derive(Debug, Clone)]
pub struct GateLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    verifier: Option<Arc<Verifier>>,
    policy: Policy,
    max_message_bytes: usize,
    in_flight: Arc<Semaphore>,
}

impl GateLayer {
    /// A gate checking tokens with `verifier` (none: every call is let in as
    /// far as identity goes), admitting at most `max_in_flight` calls at once
    /// and messages of at most `max_message_bytes`.
    pub fn new(
        verifier: Option<Arc<Verifier>>,
        policy: Policy,
        max_in_flight: usize,
        max_message_bytes: usize,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                verifier,
                policy,
                max_message_bytes,
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
            }),
        }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Gate {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`GateLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct Gate<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// A call the gate let through.
struct Admitted {
    request: http::Request<Body>,
    identity: Option<Identity>,
    permit: Option<OwnedSemaphorePermit>,
}

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The ready service answers this call; its clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let Admitted {
                request,
                identity,
                permit,
            } = match shared.admit(request).await {
                Ok(admitted) => admitted,
                Err(status) => return Ok(status.into_http()),
            };
            let call = inner.call(request);
            let response = match identity {
                Some(identity) => CALLER.scope(identity, call).await,
                None => call.await,
            };
            // The call counted as in flight until its response was ready.
            drop(permit);
            response
        })
    }
}

impl Shared {
    async fn admit(&self, request: http::Request<Body>) -> Result<Admitted, Status> {
        let method = request.uri().path().to_owned();
        let access = self.policy.access(&method);
        if access == Access::Open {
            return Ok(Admitted {
                request,
                identity: None,
                permit: None,
            });
        }

        let identity = match &self.verifier {
            Some(verifier) => Some(authorize(verifier, &request, &method, access)?),
            None => None,
        };

        let arrived = Instant::now();
        let timeout = grpc_timeout(request.headers());
        if timeout.is_some_and(|t| t.is_zero()) {
            return Err(deadline_passed());
        }

        let permit = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            info!(%method, "call refused: too many calls in flight");
            Status::unavailable("server busy: too many calls in flight; retry with backoff")
        })?;

        let request = if method.starts_with(UNARY_PREFIX) {
            self.read_whole(request).await?
        } else {
            request
        };
        if timeout.is_some_and(|t| arrived.elapsed() >= t) {
            return Err(deadline_passed());
        }

        Ok(Admitted {
            request,
            identity,
            permit: Some(permit),
        })
    }

    /// Reads the body of a single-message request, refusing it as soon as it
    /// grows past one frame of the largest message accepted.
    async fn read_whole(
        &self,
        request: http::Request<Body>,
    ) -> Result<http::Request<Body>, Status> {
        let limit = self.max_message_bytes + FRAME_HEADER_BYTES;
        let (parts, body) = request.into_parts();
        let bytes = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|err| {
                if err.downcast_ref::<LengthLimitError>().is_some() {
                    let method = parts.uri.path();
                    let limit = self.max_message_bytes;
                    info!(%method, limit, "call refused: message too large");
                    Status::resource_exhausted(format!(
                        "request message larger than {} bytes",
                        self.max_message_bytes
                    ))
                } else {
                    Status::cancelled("request body not received")
                }
            })?
            .to_bytes();
        Ok(http::Request::from_parts(
            parts,
            Body::new(Full::new(bytes)),
        ))
    }
}

/// Checks the bearer token of `request` and its role against `access`.
fn authorize(
    verifier: &Verifier,
    request: &http::Request<Body>,
    method: &str,
    access: Access,
) -> Result<Identity, Status> {
    let identity = bearer_token(request.headers())
        .ok_or(AuthError::Missing)
        .and_then(|token| verifier.verify(token))
        .map_err(|err| {
            match &err {
                AuthError::Invalid(cause) => debug!(%method, %cause, "call refused: invalid token"),
                _ => debug!(%method, cause = %err, "call refused"),
            }
            match err {
                AuthError::UnknownRole => {
                    Status::permission_denied("the token's role is not known")
                }
                err => Status::unauthenticated(format!(
                    "{err}: send `authorization: Bearer <token>` with a valid token"
                )),
            }
        })?;

    if !access.allows(identity.role) {
        let (subject, role) = (&identity.subject, identity.role);
        info!(%method, %subject, %role, "call refused: role not allowed");
        return Err(Status::permission_denied(format!(
            "role {} may not call {method}",
            identity.role
        )));
    }
    Ok(identity)
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer_token(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn deadline_passed() -> Status {
    Status::deadline_exceeded("deadline passed before the call started; nothing was done")
}

/// The `grpc-timeout` header: up to 8 digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`). A malformed value is ignored, as if absent.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, value: &'static str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(name, http::HeaderValue::from_static(value));
        headers
    }

    /// Timeouts parse in every unit; malformed ones count as absent.
    #[test]
    fn parses_grpc_timeouts() {
        let parse = |v| grpc_timeout(&headers("grpc-timeout", v));
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("0n"), Some(Duration::ZERO));
        assert_eq!(parse("123456789S"), None);
        assert_eq!(parse("1x"), None);
        assert_eq!(parse("-1S"), None);
        assert_eq!(parse("S"), None);
    }

    /// Only a well-formed bearer header yields a token.
    #[test]
    fn reads_bearer_tokens() {
        assert_eq!(
            bearer_token(&headers("authorization", "Bearer abc")),
            Some("abc")
        );
        assert_eq!(
            bearer_token(&headers("authorization", "bearer abc")),
            Some("abc")
        );
        assert_eq!(bearer_token(&headers("authorization", "Basic abc")), None);
        assert_eq!(bearer_token(&headers("authorization", "Bearer ")), None);
        assert_eq!(bearer_token(&http::HeaderMap::new()), None);
    }
}
