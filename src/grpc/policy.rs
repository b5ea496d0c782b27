//! Who may call what: one row per gRPC method, keyed by its path.
//!
//! A method missing from [`METHODS`] requires [`Role::Admin`], so a new RPC
//! is closed to everyone but operators until a row says otherwise.
//!
//! | role      | may call                                                 |
//! |-----------|----------------------------------------------------------|
//! | `user`    | `Get` of its own usage (`user_id` equal to its `sub`, or empty) |
//! | `service` | `Reserve`, `Release`, `Get` of any user                  |
//! | `admin`   | everything                                               |
//!
//! Health checks and reflection need no token, so that probes and
//! `grpcurl list` work; reflection can be made to require one.

use tonic::Status;

use crate::auth::{Identity, Role};

/// What a method asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed.
    Open,
    /// Any valid token.
    Authenticated,
    /// A `user` token for its own data, or a `service` or `admin` token. The
    /// handler applies the "own data" part, since only it reads the request.
    OwnUserOrService,
    /// A `service` or `admin` token.
    Service,
    /// An `admin` token.
    Admin,
}

impl Access {
    /// Whether `role` may call a method with this access at all.
    pub fn allows(self, role: Role) -> bool {
        match self {
            Self::Open | Self::Authenticated | Self::OwnUserOrService => true,
            Self::Service => matches!(role, Role::Service | Role::Admin),
            Self::Admin => role == Role::Admin,
        }
    }
}

/// The methods whose access is not [`Access::Admin`], by gRPC path.
pub const METHODS: &[(&str, Access)] = &[
    ("/usage.v1.UsageService/Reserve", Access::Service),
    ("/usage.v1.UsageService/Release", Access::Service),
    ("/usage.v1.UsageService/Get", Access::OwnUserOrService),
    ("/usage.v1.UsageService/ListAll", Access::Admin),
    ("/usage.v1.UsageService/Check", Access::Service),
    ("/usage.v1.UsageService/ReserveMany", Access::Service),
    ("/usage.v1.UsageService/ReleaseMany", Access::Service),
    ("/usage.v1.UsageService/Confirm", Access::Service),
    ("/usage.v1.UsageService/WatchUsage", Access::Service),
];

/// Services open to everyone, by path prefix.
const OPEN_SERVICES: &[&str] = &["/grpc.health.v1.Health/"];

/// The reflection services, open unless configured otherwise.
const REFLECTION_SERVICES: &[&str] = &[
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The access rules in force.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Whether reflection needs a (any) valid token.
    pub reflection_requires_token: bool,
}

impl Policy {
    /// The access a call to `path` needs.
    pub fn access(&self, path: &str) -> Access {
        if OPEN_SERVICES.iter().any(|prefix| path.starts_with(prefix)) {
            return Access::Open;
        }
        if REFLECTION_SERVICES
            .iter()
            .any(|prefix| path.starts_with(prefix))
        {
            return if self.reflection_requires_token {
                Access::Authenticated
            } else {
                Access::Open
            };
        }
        METHODS
            .iter()
            .find(|(method, _)| *method == path)
            .map_or(Access::Admin, |(_, access)| *access)
    }
}

/// The user whose data a call may read: `requested`, or the caller itself
/// when `requested` is empty and the caller is a user. A `user` token naming
/// another user gets `PERMISSION_DENIED`, with a message that says nothing of
/// whether that user exists. Without an identity (authentication turned off)
/// the request stands as it is.
pub fn own_user(identity: Option<&Identity>, requested: &str) -> Result<String, Status> {
    match identity {
        Some(Identity {
            subject,
            role: Role::User,
        }) => {
            if requested.is_empty() || requested == subject {
                Ok(subject.clone())
            } else {
                Err(Status::permission_denied(
                    "a user token may only read its own usage",
                ))
            }
        }
        _ => Ok(requested.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Health is always open, reflection open unless configured, and every
    /// method not in the table requires an admin.
    #[test]
    fn unlisted_methods_need_an_admin() {
        let open = Policy::default();
        let closed = Policy {
            reflection_requires_token: true,
        };
        let health = "/grpc.health.v1.Health/Check";
        let reflection = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        assert_eq!(open.access(health), Access::Open);
        assert_eq!(closed.access(health), Access::Open);
        assert_eq!(open.access(reflection), Access::Open);
        assert_eq!(closed.access(reflection), Access::Authenticated);
        assert_eq!(open.access("/usage.v1.UsageService/SetTier"), Access::Admin);
        assert_eq!(
            open.access("/usage.v1.UsageService/Reserve"),
            Access::Service
        );
        assert!(!Access::Admin.allows(Role::Service));
        assert!(!Access::Service.allows(Role::User));
        assert!(Access::Service.allows(Role::Admin));
    }

    /// A user reads itself (named or implied) and nobody else; other roles
    /// read whoever they name.
    #[test]
    fn users_read_only_themselves() {
        let user = Identity {
            subject: "alice".into(),
            role: Role::User,
        };
        assert_eq!(own_user(Some(&user), "").unwrap(), "alice");
        assert_eq!(own_user(Some(&user), "alice").unwrap(), "alice");
        let denied = own_user(Some(&user), "bob").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);

        let service = Identity {
            subject: "catalogue".into(),
            role: Role::Service,
        };
        assert_eq!(own_user(Some(&service), "bob").unwrap(), "bob");
        assert_eq!(own_user(None, "").unwrap(), "");
    }
}
