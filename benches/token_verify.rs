//! What checking a bearer token costs per call, for each kind of key.
//!
//! Run with `cargo bench --bench token_verify`; prints microseconds per
//! verification. Measures the signature and claim checks only, the work the
//! gate adds to every authenticated call, in full and for a token the
//! verifier remembers from an earlier call. Under `cargo test --all-targets`
//! (no `--bench` argument) each key is checked once and nothing is timed.

use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use usage_service::auth::{mint_hs256, Claims, Role, TokenRequest, Verifier, VerifyingKey};

const ROUNDS: u32 = 20_000;

fn main() {
    let rounds = if std::env::args().any(|arg| arg == "--bench") {
        ROUNDS
    } else {
        0
    };
    let secret = b"bench-secret-0123456789-0123456789-abcdef";
    let request = TokenRequest {
        subject: "catalogue",
        role: Role::Service,
        ttl: Duration::from_secs(3600),
        issuer: Some("issuer"),
        audience: Some("usage"),
    };
    let hs256 = Verifier::new(
        &VerifyingKey::Secret(secret.to_vec()),
        Algorithm::HS256,
        Some("issuer"),
        Some("usage"),
    )
    .expect("an HS256 verifier");
    let token = mint_hs256(secret, &request).expect("an HS256 token");
    report("HS256", &hs256, &token, rounds);

    for (algorithm, rcgen_alg) in [
        (Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256),
        (Algorithm::EdDSA, &rcgen::PKCS_ED25519),
    ] {
        let pair = rcgen::KeyPair::generate_for(rcgen_alg).expect("a key pair");
        let verifier = Verifier::new(
            &VerifyingKey::PublicKeyPem(pair.public_key_pem().into_bytes()),
            algorithm,
            Some("issuer"),
            Some("usage"),
        )
        .expect("a public-key verifier");
        let private = pair.serialize_pem();
        let key = match algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_pem(private.as_bytes()),
            _ => EncodingKey::from_ed_pem(private.as_bytes()),
        }
        .expect("a signing key");
        let claims = Claims {
            sub: "catalogue".into(),
            role: "service".into(),
            exp: jsonwebtoken::get_current_timestamp() + 3600,
            iat: None,
            iss: Some("issuer".into()),
            aud: Some("usage".into()),
        };
        let token = jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).expect("a token");
        report(&format!("{algorithm:?}"), &verifier, &token, rounds);
    }
}

/// Prints the cost of checking `token` in full, then of accepting it again
/// once remembered.
fn report(name: &str, verifier: &Verifier, token: &str, rounds: u32) {
    let remembering = verifier.clone().remembering(16);
    for verifier in [verifier, &remembering] {
        verifier.verify(token).expect("the token verifies");
    }
    if rounds == 0 {
        println!("{name:>6}: verifies");
        return;
    }
    let full = per_call(verifier, token, rounds);
    let remembered = per_call(&remembering, token, rounds);
    println!(
        "{name:>6}: {:.2} us per verification, {:.2} us once remembered ({rounds} rounds)",
        full * 1e6,
        remembered * 1e6
    );
}

/// Seconds per verification of `token`.
fn per_call(verifier: &Verifier, token: &str, rounds: u32) -> f64 {
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(verifier.verify(std::hint::black_box(token)).ok());
    }
    started.elapsed().as_secs_f64() / f64::from(rounds)
}
