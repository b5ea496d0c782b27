//! Who a caller is: bearer tokens (JWTs) and the roles they carry.
//!
//! A token is trusted only when it is signed with the key this service was
//! configured with, using the one algorithm configured with that key. The
//! algorithm named in a token's header is never used to pick how to check it:
//! a header naming any other algorithm (including `none`) is refused, which
//! rules out algorithm confusion, such as an HMAC token keyed with a public RSA
//! key. Every token must carry `exp`, `sub` and `role`; `iss` and `aud` are
//! required and checked when configured; `nbf`, when present, is honoured.
//!
//! A token that passed is remembered, up to a configured number of tokens,
//! until its `exp` (plus the leeway): the same bytes arriving again were
//! signed with the same key and carry the same claims, so only the expiry is
//! checked again. A token that failed is not remembered. With an asymmetric
//! key this is most of an authenticated call's cost: checking an ES256
//! signature takes a hundred times longer than an HMAC.
//!
//! Nothing here knows about gRPC: the transport turns [`AuthError`] into
//! statuses and decides what each [`Role`] may call.

use std::{fmt, str::FromStr, sync::Arc, time::Duration};

use jsonwebtoken::{
    errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, TokenData, Validation,
};
use serde::{Deserialize, Serialize};

/// Seconds of clock difference tolerated when checking `exp`.
const LEEWAY_SECS: u64 = 30;

/// What a caller may do, from the `role` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Role {
    /// An end user: may read its own usage only.
    User,
    /// A product service: may reserve, release and read any user's usage.
    Service,
    /// An operator: may call everything.
    Admin,
}

impl Role {
    /// The role as written in the `role` claim.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Service => "service",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Self::User),
            "service" => Ok(Self::Service),
            "admin" => Ok(Self::Admin),
            _ => Err(AuthError::UnknownRole),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The `sub` claim: a user id for [`Role::User`], a service or person name
    /// otherwise. Written as the actor of every audit row the caller causes.
    pub subject: String,
    /// The `role` claim.
    pub role: Role,
}

/// Why a token was not accepted. Each variant's doc says which gRPC code the
/// transport answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer ...` metadata. `UNAUTHENTICATED`.
    #[error("missing bearer token")]
    Missing,
    /// The token has expired. `UNAUTHENTICATED`.
    #[error("token expired")]
    Expired,
    /// The token is malformed, badly signed, signed with another algorithm,
    /// or has the wrong issuer or audience. `UNAUTHENTICATED`. Which of these
    /// it was is logged at debug level, never sent.
    #[error("invalid token")]
    Invalid(String),
    /// A valid token whose `role` is none of [`Role`]. `PERMISSION_DENIED`.
    #[error("unknown role")]
    UnknownRole,
}

/// The claims this service reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The caller.
    pub sub: String,
    /// One of `user`, `service`, `admin`.
    pub role: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// The key tokens are checked with.
pub enum VerifyingKey {
    /// A shared secret, for HS256 / HS384 / HS512.
    Secret(Vec<u8>),
    /// A PEM public key (SPKI, or PKCS#1 for RSA), for RS*, PS*, ES* or EdDSA.
    PublicKeyPem(Vec<u8>),
}

/// Checks bearer tokens against one key and one algorithm.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    algorithm: Algorithm,
    /// Tokens that passed, by their exact text; `None` checks every token.
    accepted: Option<Arc<quick_cache::sync::Cache<String, Accepted>>>,
}

/// What a token that passed was found to say.
#[derive(Debug, Clone)]
struct Accepted {
    identity: Identity,
    /// Last second, since the epoch, at which the token is still accepted:
    /// its `exp` plus the leeway.
    valid_until: u64,
}

impl fmt::Debug for Verifier {
    /// Names the algorithm and the required claims; never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .field("issuer", &self.validation.iss)
            .field("audience", &self.validation.aud)
            .field(
                "remembers",
                &self.accepted.as_ref().map(|cache| cache.capacity()),
            )
            .finish_non_exhaustive()
    }
}

/// A configuration that cannot verify anything.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The algorithm does not go with the kind of key given.
    #[error("algorithm {algorithm:?} cannot be used with {key}")]
    Mismatch {
        /// The configured algorithm.
        algorithm: Algorithm,
        /// What kind of key was given.
        key: &'static str,
    },
    /// The shared secret is too short to resist guessing.
    #[error("the shared secret must be at least {MIN_SECRET_BYTES} bytes")]
    WeakSecret,
    /// The key could not be read.
    #[error("unreadable key: {0}")]
    Unreadable(#[from] jsonwebtoken::errors::Error),
}

/// Shortest HMAC secret accepted: 256 bits, the size of an HS256 digest.
pub const MIN_SECRET_BYTES: usize = 32;

impl Verifier {
    /// A verifier accepting only `algorithm`, signed with `key`, and, when
    /// given, only tokens for `issuer` and `audience`.
    pub fn new(
        key: &VerifyingKey,
        algorithm: Algorithm,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Self, KeyError> {
        let key = decoding_key(key, algorithm)?;

        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        // Without a configured audience, a token naming one is meant for
        // another service, and the library refuses it (`validate_aud`).
        if let Some(audience) = audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);

        Ok(Self {
            key,
            validation,
            algorithm,
            accepted: None,
        })
    }

    /// Remembers up to `tokens` tokens that passed, so that a token seen
    /// again is not checked again until it expires; 0 remembers none.
    pub fn remembering(mut self, tokens: usize) -> Self {
        self.accepted = (tokens > 0).then(|| Arc::new(quick_cache::sync::Cache::new(tokens)));
        self
    }

    /// The one algorithm accepted.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Checks `token` and returns the caller it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_at(token, jsonwebtoken::get_current_timestamp())
    }

    /// [`verify`](Self::verify) at `now`, seconds since the epoch. `now`
    /// decides only whether a remembered token has expired since it passed:
    /// a token not remembered is checked against the system clock.
    fn verify_at(&self, token: &str, now: u64) -> Result<Identity, AuthError> {
        let Some(accepted) = &self.accepted else {
            return self.check(token).map(|(identity, _)| identity);
        };
        if let Some(known) = accepted.get(token) {
            if now <= known.valid_until {
                return Ok(known.identity);
            }
            accepted.remove(token);
            return Err(AuthError::Expired);
        }
        let (identity, exp) = self.check(token)?;
        accepted.insert(
            token.to_owned(),
            Accepted {
                identity: identity.clone(),
                valid_until: exp.saturating_add(LEEWAY_SECS),
            },
        );
        Ok(identity)
    }

    /// The signature and every claim of `token`: the caller it names and its
    /// `exp`.
    fn check(&self, token: &str) -> Result<(Identity, u64), AuthError> {
        let data: TokenData<Claims> = jsonwebtoken::decode(token, &self.key, &self.validation)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(err.to_string()),
            })?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("empty sub claim".into()));
        }
        let identity = Identity {
            role: claims.role.parse()?,
            subject: claims.sub,
        };
        Ok((identity, claims.exp))
    }
}

fn decoding_key(key: &VerifyingKey, algorithm: Algorithm) -> Result<DecodingKey, KeyError> {
    use Algorithm::*;
    let key = match (key, algorithm) {
        (VerifyingKey::Secret(secret), HS256 | HS384 | HS512) => {
            if secret.len() < MIN_SECRET_BYTES {
                return Err(KeyError::WeakSecret);
            }
            DecodingKey::from_secret(secret)?
        }
        (VerifyingKey::PublicKeyPem(pem), RS256 | RS384 | RS512 | PS256 | PS384 | PS512) => {
            DecodingKey::from_rsa_pem(pem)?
        }
        (VerifyingKey::PublicKeyPem(pem), ES256 | ES384) => DecodingKey::from_ec_pem(pem)?,
        (VerifyingKey::PublicKeyPem(pem), EdDSA) => DecodingKey::from_ed_pem(pem)?,
        (VerifyingKey::Secret(_), algorithm) => {
            return Err(KeyError::Mismatch {
                algorithm,
                key: "a shared secret",
            })
        }
        (VerifyingKey::PublicKeyPem(_), algorithm) => {
            return Err(KeyError::Mismatch {
                algorithm,
                key: "a public key",
            })
        }
    };
    Ok(key)
}

/// What a minted token says.
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    /// The caller the token names.
    pub subject: &'a str,
    /// Its role.
    pub role: Role,
    /// How long it is valid from now.
    pub ttl: Duration,
    /// The `iss` claim, when the service requires one.
    pub issuer: Option<&'a str>,
    /// The `aud` claim, when the service requires one.
    pub audience: Option<&'a str>,
}

/// Signs an HS256 token with `secret`, for people trying the API and for
/// tests. Services in production get their tokens from an identity provider.
pub fn mint_hs256(secret: &[u8], request: &TokenRequest<'_>) -> Result<String, KeyError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(KeyError::WeakSecret);
    }
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: request.subject.to_owned(),
        role: request.role.as_str().to_owned(),
        exp: now + request.ttl.as_secs(),
        iat: Some(now),
        iss: request.issuer.map(str::to_owned),
        aud: request.audience.map(str::to_owned),
    };
    let key = EncodingKey::from_secret(secret)?;
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &key,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn request(role: Role) -> TokenRequest<'static> {
        TokenRequest {
            subject: "alice",
            role,
            ttl: Duration::from_secs(60),
            issuer: Some("issuer"),
            audience: Some("usage"),
        }
    }

    /// A minted token verifies to the identity it was minted for, and only
    /// with the issuer and audience it names.
    #[test]
    fn minted_tokens_verify() {
        let verifier = Verifier::new(
            &VerifyingKey::Secret(SECRET.to_vec()),
            Algorithm::HS256,
            Some("issuer"),
            Some("usage"),
        )
        .unwrap();
        let token = mint_hs256(SECRET, &request(Role::Service)).unwrap();
        assert_eq!(
            verifier.verify(&token),
            Ok(Identity {
                subject: "alice".into(),
                role: Role::Service
            })
        );

        let other = Verifier::new(
            &VerifyingKey::Secret(SECRET.to_vec()),
            Algorithm::HS256,
            Some("issuer"),
            Some("billing"),
        )
        .unwrap();
        assert!(matches!(other.verify(&token), Err(AuthError::Invalid(_))));
    }

    /// Without a configured audience, a token naming one is meant for another
    /// service and is refused; without a configured issuer, any is accepted.
    #[test]
    fn audience_in_token_needs_a_configured_audience() {
        let verifier = Verifier::new(
            &VerifyingKey::Secret(SECRET.to_vec()),
            Algorithm::HS256,
            None,
            None,
        )
        .unwrap();
        let for_someone = mint_hs256(SECRET, &request(Role::Admin)).unwrap();
        assert!(matches!(
            verifier.verify(&for_someone),
            Err(AuthError::Invalid(_))
        ));

        let for_anyone = TokenRequest {
            audience: None,
            ..request(Role::Admin)
        };
        let token = mint_hs256(SECRET, &for_anyone).unwrap();
        assert_eq!(verifier.verify(&token).unwrap().role, Role::Admin);
    }

    /// Short secrets and keys of the wrong kind for the algorithm are refused
    /// at start-up.
    #[test]
    fn refuses_weak_or_mismatched_keys() {
        let short = VerifyingKey::Secret(b"short".to_vec());
        assert!(matches!(
            Verifier::new(&short, Algorithm::HS256, None, None),
            Err(KeyError::WeakSecret)
        ));
        let secret = VerifyingKey::Secret(SECRET.to_vec());
        assert!(matches!(
            Verifier::new(&secret, Algorithm::RS256, None, None),
            Err(KeyError::Mismatch { .. })
        ));
        let public = VerifyingKey::PublicKeyPem(b"not a key".to_vec());
        assert!(matches!(
            Verifier::new(&public, Algorithm::HS256, None, None),
            Err(KeyError::Mismatch { .. })
        ));
    }

    fn remembering_verifier() -> Verifier {
        Verifier::new(
            &VerifyingKey::Secret(SECRET.to_vec()),
            Algorithm::HS256,
            Some("issuer"),
            Some("usage"),
        )
        .unwrap()
        .remembering(16)
    }

    fn remembered(verifier: &Verifier) -> usize {
        verifier.accepted.as_ref().map_or(0, |cache| cache.len())
    }

    /// A remembered token is refused once past its `exp` and the leeway,
    /// and is then forgotten: the next call checks it in full again.
    #[test]
    fn remembered_tokens_still_expire() {
        let verifier = remembering_verifier();
        let now = jsonwebtoken::get_current_timestamp();
        let token = mint_hs256(SECRET, &request(Role::Service)).unwrap();
        let alice = Identity {
            subject: "alice".into(),
            role: Role::Service,
        };

        assert_eq!(verifier.verify(&token), Ok(alice.clone()));
        assert_eq!(remembered(&verifier), 1);
        // Within exp (60 s from minting) plus the leeway: still accepted.
        assert_eq!(verifier.verify_at(&token, now + 60), Ok(alice.clone()));
        let expired_at = now + 60 + LEEWAY_SECS + 2;
        assert_eq!(
            verifier.verify_at(&token, expired_at),
            Err(AuthError::Expired)
        );
        assert_eq!(remembered(&verifier), 0);
        // By the real clock the token is valid: checked afresh, remembered again.
        assert_eq!(verifier.verify(&token), Ok(alice));
        assert_eq!(remembered(&verifier), 1);
    }

    /// Only tokens that passed are remembered, and a remembered token lets
    /// in nothing but its own exact text.
    #[test]
    fn remembers_only_tokens_that_passed() {
        let verifier = remembering_verifier();
        let token = mint_hs256(SECRET, &request(Role::Service)).unwrap();
        // One character of the signature changed.
        let at = token.len() - 10;
        let swapped = if &token[at..=at] == "A" { "B" } else { "A" };
        let forged = format!("{}{swapped}{}", &token[..at], &token[at + 1..]);
        let unknown_role = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "mallory".into(),
                role: "root".into(),
                exp: jsonwebtoken::get_current_timestamp() + 60,
                iat: None,
                iss: Some("issuer".into()),
                aud: Some("usage".into()),
            },
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();

        for _ in 0..2 {
            assert!(matches!(
                verifier.verify(&forged),
                Err(AuthError::Invalid(_))
            ));
            assert_eq!(verifier.verify(&unknown_role), Err(AuthError::UnknownRole));
        }
        assert_eq!(remembered(&verifier), 0);
        assert!(verifier.verify(&token).is_ok());
        assert!(matches!(
            verifier.verify(&forged),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(remembered(&verifier), 1);
    }

    /// Roles parse from their claim names and nothing else.
    #[test]
    fn parses_roles() {
        assert_eq!("admin".parse::<Role>(), Ok(Role::Admin));
        assert_eq!("Admin".parse::<Role>(), Err(AuthError::UnknownRole));
        assert_eq!("root".parse::<Role>(), Err(AuthError::UnknownRole));
    }
}
