# Multi-stage build: dependencies are compiled in their own cached layer, the
# runtime image holds only the binary and runs as an unprivileged user.

FROM rust:1-slim-bookworm AS build
WORKDIR /src

# Dependencies first: this layer is rebuilt only when the manifests change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && mkdir -p proto/usage/v1 && echo 'syntax = "proto3"; package usage.v1;' > proto/usage/v1/usage.proto \
    && printf 'fn main() {}\n' > build.rs \
    && cargo build --release --locked --bin usage-service \
    && rm -rf src proto build.rs

COPY build.rs ./
COPY proto proto
COPY migrations migrations
COPY src src
# Make sure the real sources are newer than the placeholder build.
RUN touch src/main.rs src/lib.rs build.rs \
    && cargo build --release --locked --bin usage-service

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home usage
COPY --from=build /src/target/release/usage-service /usr/local/bin/usage-service
USER 10001
EXPOSE 50051
ENV USAGE_LISTEN_ADDR=0.0.0.0:50051 USAGE_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/usage-service"]
CMD ["serve"]
