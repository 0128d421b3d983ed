//! Who is calling, and what they may do: bearer tokens, their hashes, the role each route
//! needs.
//!
//! Users hold named tokens with a role ([`Role`]). The center keeps only the SHA-256 of each
//! token: the secret is 256 random bits, so a fast hash is enough (no password stretching is
//! needed for a value nobody can guess), and a stolen database yields no usable token. The
//! admin token file on the center host is the bootstrap identity, named `admin`.

use axum::http::{header, HeaderMap, Method};
use sha2::{Digest, Sha256};
use tern_api::center::Role;
use tern_api::routes::{center as route, Route};

/// The name the admin token file's holder is recorded under.
pub const ADMIN_NAME: &str = "admin";

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Compares tokens in time independent of where they differ.
pub fn token_eq(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// What the store keeps of a token: its SHA-256, hex.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The role a call needs. Reading needs a viewer (the token list, an admin); changing a VM,
/// a migration, a task, a host's maintenance, evacuation or health, or applying DRS needs an operator; every other
/// change needs an admin, so a route added later is an admin's until it is listed here.
pub fn required_role(method: &Method, matched: &str) -> Role {
    let is = |r: Route| matched == r.template();
    if is(route::TOKENS) || is(route::TOKEN) {
        return Role::Admin;
    }
    if method == Method::GET || method == Method::HEAD {
        return Role::Viewer;
    }
    let operator = [
        route::VMS,
        route::VM,
        route::VM_START,
        route::VM_STOP,
        route::VM_RESOURCES,
        route::VM_POOL,
        route::VM_MIGRATE,
        route::TASK_CANCEL,
        route::HOST_MAINTENANCE,
        route::HOST_EVACUATE,
        route::HOST_HEALTH,
        route::CLUSTER_DRS_APPLY,
    ];
    if operator.into_iter().any(is) {
        Role::Operator
    } else {
        Role::Admin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sha256_hex() {
        // SHA-256("abc"), FIPS 180-2's example.
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn every_route_needs_the_role_its_changes_deserve() {
        use Method as M;
        let t = |r: Route| r.template();
        assert_eq!(required_role(&M::GET, t(route::VMS)), Role::Viewer);
        assert_eq!(required_role(&M::GET, t(route::EVENTS)), Role::Viewer);
        assert_eq!(required_role(&M::POST, t(route::VMS)), Role::Operator);
        assert_eq!(required_role(&M::DELETE, t(route::VM)), Role::Operator);
        assert_eq!(
            required_role(&M::PUT, t(route::VM_RESOURCES)),
            Role::Operator
        );
        assert_eq!(
            required_role(&M::POST, t(route::VM_MIGRATE)),
            Role::Operator
        );
        assert_eq!(required_role(&M::POST, t(route::CLUSTERS)), Role::Admin);
        assert_eq!(required_role(&M::POST, t(route::CLUSTER_EVC)), Role::Admin);
        assert_eq!(required_role(&M::PUT, t(route::CLUSTER_DRS)), Role::Admin);
        assert_eq!(required_role(&M::GET, t(route::TOKENS)), Role::Admin);
        assert_eq!(required_role(&M::DELETE, t(route::TOKEN)), Role::Admin);
        // Operators empty and mark hosts and move VMs between pools; the pools themselves
        // (how the cluster is divided) are an admin's.
        for (m, r) in [
            (M::POST, route::HOST_EVACUATE),
            (M::PUT, route::HOST_HEALTH),
            (M::DELETE, route::HOST_HEALTH),
            (M::PUT, route::VM_POOL),
        ] {
            assert_eq!(required_role(&m, t(r)), Role::Operator, "{m} {r}");
        }
        for (m, r) in [
            (M::POST, route::CLUSTER_POOLS),
            (M::PUT, route::POOL),
            (M::DELETE, route::POOL),
        ] {
            assert_eq!(required_role(&m, t(r)), Role::Admin, "{m} {r}");
        }
        assert_eq!(required_role(&M::GET, t(route::POOL)), Role::Viewer);
        // Unknown changes are an admin's.
        assert_eq!(
            required_role(&M::POST, "/api/v1/something-new"),
            Role::Admin
        );
    }
}
