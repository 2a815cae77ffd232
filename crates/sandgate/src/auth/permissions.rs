//! Roles and what each may do: the one permission table for the control API and the proxy
//! (the README's permission table is this file, in prose). A route not listed needs `Read`,
//! so an unknown path tells an unauthenticated client nothing.

use std::fmt;
use std::str::FromStr;

/// A key's or token's role, from most to least powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Viewer,
    Member,
    Admin,
    /// The whole instance: every team's sandboxes and keys, and the teams themselves.
    Owner,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Owner, Role::Admin, Role::Member, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
        }
    }

    /// Whether this role may do what `need` asks.
    pub fn allows(self, need: Need) -> bool {
        match need {
            Need::Nothing => true,
            Need::Read => true,
            Need::Write => self >= Role::Member,
            Need::Admin => self >= Role::Admin,
            Need::Owner => self == Role::Owner,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: one of owner, admin, member, viewer"))
    }
}

/// What a request needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// No credential at all (liveness, `/health/auth`).
    Nothing,
    /// Any role: read-only API calls, GET-like proxied requests.
    Read,
    /// `member`: change sandboxes, run commands, any proxied request.
    Write,
    /// `admin`: the team's keys and audit log.
    Admin,
    /// `owner`: teams.
    Owner,
}

/// What a control-API request needs, by method and path.
pub fn api(method: &str, path: &str) -> Need {
    let mut segs = path.trim_start_matches('/').split('/');
    let first = segs.next().unwrap_or("");
    let read_only = matches!(method, "GET" | "HEAD");
    match first {
        "health" => match segs.next() {
            // Kubernetes probes (`live`, `ready`) carry no credential.
            None | Some("") | Some("auth") | Some("proxy") | Some("live") | Some("ready") => {
                Need::Nothing
            }
            _ => Need::Read,
        },
        "teams" => Need::Owner,
        // Figures across every team (the `--metrics-addr` listener needs none).
        "metrics" => Need::Owner,
        // What this is (no data): `GET /`.
        "" if read_only => Need::Nothing,
        // The terminal page and its assets: static, no data (the page authenticates its
        // WebSocket itself).
        "ui" => Need::Nothing,
        // Seed 004's command socket: opening it (a GET upgrade) runs commands.
        "ws" => Need::Write,
        // Exec results and logs are the output of a member's commands: members only, reads
        // too.
        "sandboxes" if matches!(segs.nth(1), Some("exec" | "pty")) => Need::Write,
        "audit" => Need::Admin,
        "auth" => match segs.next() {
            Some("keys") => Need::Admin,
            // Any role mints a token carrying its own role.
            Some("token") => Need::Read,
            _ => Need::Read,
        },
        _ if read_only => Need::Read,
        _ => Need::Write,
    }
}

/// What a proxied request needs: a viewer may only read (no method with side effects, no
/// protocol switch).
pub fn proxy(method: &str, upgrade: bool) -> Need {
    match method {
        "GET" | "HEAD" | "OPTIONS" if !upgrade => Need::Read,
        _ => Need::Write,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        assert_eq!(api("GET", "/health"), Need::Nothing);
        assert_eq!(api("GET", "/health/auth"), Need::Nothing);
        assert_eq!(api("GET", "/health/live"), Need::Nothing);
        assert_eq!(api("GET", "/health/ready"), Need::Nothing);
        assert_eq!(api("GET", "/health/sandboxes"), Need::Read);
        assert_eq!(api("GET", "/health/pools"), Need::Read);
        assert_eq!(api("GET", "/sandboxes"), Need::Read);
        assert_eq!(api("POST", "/sandboxes"), Need::Write);
        assert_eq!(api("DELETE", "/sandboxes/x"), Need::Write);
        assert_eq!(api("POST", "/auth/keys"), Need::Admin);
        assert_eq!(api("POST", "/auth/token"), Need::Read);
        assert_eq!(api("GET", "/teams"), Need::Owner);
        assert_eq!(api("GET", "/nowhere"), Need::Read);
        assert_eq!(api("GET", "/ws/sb"), Need::Write);
        assert_eq!(api("GET", "/ui/assets/xterm.js"), Need::Nothing);
        assert_eq!(api("GET", "/sandboxes/sb/pty"), Need::Write);
        assert_eq!(api("POST", "/sandboxes/sb/exec"), Need::Write);
        assert_eq!(api("GET", "/sandboxes/sb/exec/ex-1"), Need::Write);
        assert_eq!(api("GET", "/sandboxes/sb/logs"), Need::Read);
        assert_eq!(api("GET", "/sandboxes/exec"), Need::Read);
        assert!(Role::Viewer.allows(Need::Read) && !Role::Viewer.allows(Need::Write));
        assert!(Role::Member.allows(Need::Write) && !Role::Member.allows(Need::Admin));
        assert!(Role::Admin.allows(Need::Admin) && !Role::Admin.allows(Need::Owner));
        assert!(Role::Owner.allows(Need::Owner));
        assert_eq!(proxy("GET", true), Need::Write);
        assert_eq!("admin".parse::<Role>(), Ok(Role::Admin));
        assert!("root".parse::<Role>().is_err());
    }
}
