//! A tower layer counting every gRPC call by RPC and status code and timing
//! it, in front of all services (usage, health, reflection).

use std::{
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use tonic::{
    codegen::http::{HeaderMap, Request, Response},
    Code,
};
use tower::{Layer, Service};

use crate::metrics;

/// Wraps a service in [`Metered`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MeteredLayer;

impl<S> Layer<S> for MeteredLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered { inner }
    }
}

/// Records `usage_grpc_requests_total` and
/// `usage_grpc_request_duration_seconds` for each call it forwards.
///
/// The time is taken when the response headers are ready. For the unary
/// calls of this service that is when the handler has returned; a streaming
/// call (reflection) is counted when its stream opens.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Metered<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        // A clone of the URI shares its bytes: no copy of the path per call.
        let uri = request.uri().clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(response) => status_code(response.headers()),
                Err(_) => Code::Internal,
            };
            metrics::record_request(uri.path(), code, started.elapsed());
            response
        })
    }
}

/// Every method the server serves, as `/package.Service/Method`: read from
/// the descriptors it also registers for reflection.
pub(crate) fn served_methods() -> impl Iterator<Item = String> {
    use prost::Message as _;
    [
        crate::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
    .into_iter()
    .flat_map(|encoded| {
        prost_types::FileDescriptorSet::decode(encoded)
            .expect("the descriptors compiled into the binary decode")
            .file
    })
    .flat_map(|file| {
        let package = file.package().to_owned();
        file.service.into_iter().flat_map(move |service| {
            let prefix = format!("/{package}.{}/", service.name());
            service
                .method
                .into_iter()
                .map(move |method| format!("{prefix}{}", method.name()))
        })
    })
}

/// The status of a response: errors travel in the headers
/// (trailers-only responses); a response without `grpc-status` in its headers
/// carries its status in the trailers, which tonic only does for success.
fn status_code(headers: &HeaderMap) -> Code {
    headers
        .get("grpc-status")
        .map_or(Code::Ok, |value| Code::from_bytes(value.as_bytes()))
}

/// The canonical name of a gRPC code, as in the gRPC specification.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status in the headers is read; no status in the headers means the
    /// call succeeded and its OK travels in the trailers.
    #[test]
    fn reads_the_status_from_headers() {
        let mut headers = HeaderMap::new();
        assert_eq!(status_code(&headers), Code::Ok);
        headers.insert("grpc-status", "8".parse().unwrap());
        assert_eq!(status_code(&headers), Code::ResourceExhausted);
        assert_eq!(code_name(status_code(&headers)), "RESOURCE_EXHAUSTED");
    }
}
