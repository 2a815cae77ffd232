//! Authentication and tenancy: who is asking (a [`Principal`]: team, role, subject) from the
//! credentials a request carries, with every verified credential held in memory so a proxied
//! request never waits on the store. Used by the request policy's check step, identically for
//! both proxy lanes, and by the control API's key and team routes.

pub mod jwks;
pub mod keys;
pub mod permissions;
pub mod preview;
pub mod tokens;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};

use crate::config::{AuthProvider, Config};
use crate::error::Error;
use crate::model::DEFAULT_TEAM;
use crate::store::{KeyRecord, Store, StoreError};
pub use permissions::{Need, Role};
use tokens::{External, ExternalKeys, Tokens};

/// Why authentication could not be set up at startup.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// How a request proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// Authentication is off (`AUTH_ENABLED=false`): every request acts as the owner.
    Open,
    /// An API key.
    Key,
    /// A token minted by `POST /auth/token` (its subject is the key it was minted from).
    Token,
    /// An identity provider's token.
    External,
    /// A browser preview token (cookie): one sandbox, possibly one port.
    Preview,
    /// A public sandbox port: no credential.
    Public,
}

/// Who a request acts as.
#[derive(Debug, Clone)]
pub struct Principal {
    pub team: Arc<str>,
    pub role: Role,
    /// The key id (or token subject): what the audit log and rate limits name.
    pub subject: Arc<str>,
    pub via: Via,
}

impl Principal {
    /// A principal scoped to one sandbox of `team` (a preview cookie, a public port): it may
    /// use the sandbox's app fully and nothing else (the policy checks the scope).
    pub fn for_sandbox(team: &str, via: Via) -> Principal {
        Principal {
            team: team.into(),
            role: Role::Member,
            subject: match via {
                Via::Public => "public".into(),
                _ => "preview".into(),
            },
            via,
        }
    }

    /// Whether this principal may see records of `team` (anything else is "not found").
    pub fn sees(&self, team: &str) -> bool {
        self.role == Role::Owner || &*self.team == team
    }

    /// Refuses with `AUTH_003` unless the role allows `need`.
    pub fn require(&self, need: Need) -> Result<(), Error> {
        if self.role.allows(need) {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "the {} role may not do this",
                self.role
            )))
        }
    }
}

/// The credentials a request head carries, as raw field values (see `policy::head::facts`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The first `X-API-Key` value.
    pub api_key: Option<&'a [u8]>,
    /// How many `X-API-Key` fields there were (more than one is refused).
    pub api_keys: u8,
    /// The first `Authorization` value.
    pub authorization: Option<&'a [u8]>,
    /// `sandgate_preview` cookie values (the first few).
    pub previews: [&'a [u8]; 4],
    pub preview_count: u8,
    /// A credential offered as the WebSocket subprotocol `sandgate.auth.<credential>` (how a
    /// browser authenticates a WebSocket: it cannot set headers). Honoured only where the
    /// request policy allows it (the terminal and command sockets).
    pub subprotocol: Option<&'a [u8]>,
}

/// A verified request: who, and whether its `Authorization` field was the gateway's
/// credential (then it never reaches a sandbox).
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub principal: Principal,
    pub consumed_authorization: bool,
}

/// A key as the gateway holds it in memory.
#[derive(Debug)]
pub struct KeyEntry {
    pub record: KeyRecord,
    principal: Principal,
    /// Unix seconds after which the key is refused.
    expires: Option<i64>,
    /// Unix seconds of the last use, and of the last use written to the store.
    last_used: AtomicI64,
    flushed: AtomicI64,
}

impl KeyEntry {
    fn new(record: KeyRecord) -> Result<KeyEntry, StoreError> {
        let role: Role = record.role.parse().map_err(|message| StoreError::Corrupt {
            id: record.id.clone(),
            message,
        })?;
        let used = record.last_used_at.map_or(0, |t| t.timestamp());
        Ok(KeyEntry {
            principal: Principal {
                team: record.team.as_str().into(),
                role,
                subject: record.id.as_str().into(),
                via: Via::Key,
            },
            expires: record.expires_at.map(|t| t.timestamp()),
            last_used: AtomicI64::new(used),
            flushed: AtomicI64::new(used),
            record,
        })
    }

    pub fn role(&self) -> Role {
        self.principal.role
    }

    /// When the key was last used (to the second), if ever.
    pub fn last_used(&self) -> Option<DateTime<Utc>> {
        match self.last_used.load(Ordering::Relaxed) {
            0 => None,
            s => DateTime::from_timestamp(s, 0),
        }
    }
}

/// The authenticator: every active key, in memory (loaded at start, written through on
/// create and revoke).
pub struct Auth {
    enabled: bool,
    store: Arc<dyn Store>,
    keys: RwLock<HashMap<Box<str>, Arc<KeyEntry>>>,
    open: Principal,
    tokens: Option<Tokens>,
    /// The identity provider's JWKS URL (and extra CA), fetched again every 10 minutes.
    jwks_url: Option<(String, Option<std::path::PathBuf>)>,
    previews: preview::Previews,
    /// Team names, for identity-provider tokens (whose team must exist).
    teams: RwLock<HashSet<String>>,
    failures: AtomicU64,
    /// Failures in the current and the previous minute: `(minute, current, previous)`.
    recent: std::sync::Mutex<(i64, u64, u64)>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Auth {
    /// Loads every active key from the store. With authentication on and no key at all (a
    /// first start), creates the `default` team's owner key: `SANDGATE_ADMIN_KEY` if set,
    /// else a new one printed once on stderr and written to `<data-dir>/admin.key` (0600).
    /// A configured admin key is (re)written at every start, so changing it takes effect.
    pub async fn load(store: Arc<dyn Store>, config: &Config) -> Result<Auth, LoadError> {
        let tokens = match config.auth_provider {
            AuthProvider::ApiKey => None,
            AuthProvider::Jwt => Some(load_tokens(store.as_ref(), config).await?),
        };
        let teams = store.teams().await?.into_iter().map(|t| t.id).collect();
        let preview_secret = store.secret("preview", &keys::generate().key).await?;
        let auth = Auth {
            enabled: config.auth_enabled,
            store,
            keys: RwLock::default(),
            open: Principal {
                team: DEFAULT_TEAM.into(),
                role: Role::Owner,
                subject: "anonymous".into(),
                via: Via::Open,
            },
            tokens,
            jwks_url: config
                .jwt
                .jwks
                .as_ref()
                .and_then(|p| p.to_str())
                .filter(|s| jwks::is_url(s))
                .map(|s| (s.to_string(), config.jwt.jwks_ca.clone())),
            previews: preview::Previews::new(preview_secret.as_bytes()),
            teams: RwLock::new(teams),
            failures: AtomicU64::new(0),
            recent: std::sync::Mutex::new((0, 0, 0)),
        };
        if let Some(key) = config.admin_key.as_ref().map(|k| k.expose()) {
            let id = match keys::parse(key) {
                keys::Parsed::Key(id) => id.to_string(),
                _ => keys::CONFIGURED_ID.to_string(),
            };
            let record = owner_record(id, "configured admin key (SANDGATE_ADMIN_KEY)", key);
            auth.store.put_key(&record, true).await?;
        }
        let mut records = auth.store.keys().await?;
        if records.is_empty() && config.auth_enabled {
            let new = keys::generate();
            let record = owner_record(new.id, "first owner key", &new.key);
            if auth.store.put_first_key(&record).await? {
                write_admin_key(&config.data_dir, &new.key).map_err(|e| LoadError::File {
                    path: config.data_dir.join("admin.key").display().to_string(),
                    message: e.to_string(),
                })?;
                eprintln!(
                    "sandgate: created the owner API key of team \"default\" (shown once; also in {}):\n{}",
                    config.data_dir.join("admin.key").display(),
                    new.key
                );
            }
            // Another gateway on the same database may have created the first key meanwhile:
            // the store says which one exists.
            records = auth.store.keys().await?;
        }
        for r in records {
            auth.insert(KeyEntry::new(r)?);
        }
        Ok(auth)
    }

    fn insert(&self, entry: KeyEntry) {
        let id: Box<str> = entry.record.id.as_str().into();
        self.write().insert(id, Arc::new(entry));
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Box<str>, Arc<KeyEntry>>> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Box<str>, Arc<KeyEntry>>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Who a request with these credentials acts as. `Ok(None)`: it carries none.
    /// Pure apart from the key's last-use time: no store, no lock held beyond a hash probe.
    pub fn authenticate(&self, creds: &Credentials<'_>) -> Result<Option<Authenticated>, Error> {
        if !self.enabled {
            return Ok(Some(Authenticated {
                principal: self.open.clone(),
                consumed_authorization: false,
            }));
        }
        if creds.api_keys > 1 {
            return Err(Error::BadCredential("more than one X-API-Key field"));
        }
        if let Some(key) = creds.api_key {
            let principal = self.verify_key(key)?;
            // An `Authorization` carrying a sandgate key is the gateway's even when unused.
            let consumed_authorization = creds
                .authorization
                .is_some_and(|a| bearer(a).is_some_and(|t| t.starts_with(keys::PREFIX.as_bytes())));
            return Ok(Some(Authenticated {
                principal,
                consumed_authorization,
            }));
        }
        let from_header = creds.authorization.and_then(bearer);
        let Some(token) = from_header.or(creds.subprotocol) else {
            return Ok(None);
        };
        let principal = match &self.tokens {
            Some(t) if tokens::looks_like_jwt(token) => t.verify(
                token,
                unix_now(),
                |key| self.read().contains_key(key),
                |team| {
                    self.teams
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(team)
                },
            )?,
            _ => self.verify_key(token)?,
        };
        Ok(Some(Authenticated {
            principal,
            consumed_authorization: from_header.is_some(),
        }))
    }

    /// Mints a token for an API key's principal (`POST /auth/token`); `None` when tokens are
    /// off (`AUTH_PROVIDER=api_key`). Returns the token and its lifetime.
    pub fn mint(
        &self,
        principal: &Principal,
        ttl: Option<u64>,
    ) -> Result<Option<(String, u64)>, Error> {
        let Some(t) = &self.tokens else {
            return Ok(None);
        };
        let ttl = ttl.unwrap_or(t.expiry).min(t.expiry);
        Ok(Some((t.mint(principal, ttl, unix_now())?, ttl)))
    }

    /// Issues a preview token for `sandbox` (and `port`), valid `ttl` seconds.
    pub fn issue_preview(
        &self,
        sandbox: &crate::model::Sandbox,
        port: Option<u16>,
        ttl: i64,
    ) -> (String, i64) {
        let expires = unix_now() + ttl;
        let token = self
            .previews
            .issue(&sandbox.id, port, sandbox.preview_generation, expires);
        (token, expires)
    }

    /// The scope of a preview token if it opens `sandbox` on `port`.
    pub fn preview(
        &self,
        token: &[u8],
        sandbox: &crate::model::Sandbox,
        port: Option<u16>,
    ) -> Option<preview::Scope> {
        self.previews
            .verify(token, &sandbox.id, sandbox.preview_generation, unix_now())
            .filter(|scope| scope.port.is_none() || scope.port == port)
    }

    /// Unix seconds now.
    pub fn now(&self) -> i64 {
        unix_now()
    }

    /// Records a new team (identity-provider tokens may name it from now on).
    pub fn team_created(&self, team: &str) {
        self.teams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(team.to_string());
    }

    /// Which credential kinds are accepted (for `/health/auth`).
    pub fn providers(&self) -> Vec<&'static str> {
        let mut p = vec!["api_key"];
        if let Some(t) = &self.tokens {
            p.push("jwt");
            if t.external() {
                p.push("identity_provider");
            }
        }
        p
    }

    /// Verified credentials held in memory: keys and cached tokens.
    pub fn cache_size(&self) -> usize {
        self.key_count() + self.tokens.as_ref().map_or(0, Tokens::cache_size)
    }

    /// Fetches the identity provider's JWKS URL again (key rotation); a failure keeps the
    /// keys in use and is logged.
    pub async fn refresh_jwks(&self) {
        let (Some((url, ca)), Some(ext)) = (
            &self.jwks_url,
            self.tokens.as_ref().and_then(Tokens::provider),
        ) else {
            return;
        };
        match jwks::fetch(url, ca.as_deref())
            .await
            .and_then(|doc| ext.replace(&doc))
        {
            Ok(n) => tracing::debug!(%url, keys = n, "identity provider keys refreshed"),
            Err(e) => {
                tracing::warn!(%url, error = %e, "could not refresh the identity provider's keys; keeping the current ones")
            }
        }
    }

    /// Drops expired tokens from the cache.
    pub fn sweep(&self) {
        if let Some(t) = &self.tokens {
            t.sweep(unix_now());
        }
    }

    fn verify_key(&self, key: &[u8]) -> Result<Principal, Error> {
        let key = std::str::from_utf8(key)
            .map_err(|_| Error::BadCredential("the API key is not valid text"))?
            .trim();
        let id = match keys::parse(key) {
            keys::Parsed::Key(id) => id,
            keys::Parsed::BadChecksum => {
                return Err(Error::BadCredential(
                    "the API key's checksum does not match (mistyped or truncated?)",
                ))
            }
            keys::Parsed::Other => keys::CONFIGURED_ID,
        };
        let entry = self.read().get(id).cloned();
        let entry = match entry {
            Some(e) if keys::matches(key.as_bytes(), &e.record.hash) => e,
            _ => return Err(Error::BadCredential("unknown or revoked API key")),
        };
        let now = unix_now();
        if entry.expires.is_some_and(|t| t <= now) {
            return Err(Error::BadCredential("the API key has expired"));
        }
        if entry.last_used.load(Ordering::Relaxed) != now {
            entry.last_used.store(now, Ordering::Relaxed);
        }
        Ok(entry.principal.clone())
    }

    /// Counts a refused credential (for `/health/auth`).
    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let minute = unix_now() / 60;
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        roll(&mut r, minute);
        r.1 += 1;
    }

    /// Refused credentials since the start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Refused credentials over the last minute or so (this minute and the one before).
    pub fn recent_failures(&self) -> u64 {
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        roll(&mut r, unix_now() / 60);
        r.1 + r.2
    }

    pub fn key_count(&self) -> usize {
        self.read().len()
    }

    /// Active keys `viewer` may see (its team's; every team's for an owner).
    pub fn keys_for(&self, viewer: &Principal) -> Vec<Arc<KeyEntry>> {
        let mut v: Vec<_> = self
            .read()
            .values()
            .filter(|k| viewer.sees(&k.record.team))
            .cloned()
            .collect();
        v.sort_by(|a, b| {
            (a.record.created_at, &a.record.id).cmp(&(b.record.created_at, &b.record.id))
        });
        v
    }

    /// Creates a key; returns its entry and the key text (shown once).
    pub async fn create_key(
        &self,
        team: &str,
        name: &str,
        role: Role,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(Arc<KeyEntry>, String), Error> {
        let new = keys::generate();
        let record = KeyRecord {
            id: new.id,
            team: team.to_string(),
            name: name.to_string(),
            role: role.as_str().to_string(),
            hash: keys::hash(new.key.as_bytes()),
            created_at: crate::model::now(),
            expires_at,
            last_used_at: None,
        };
        self.store.put_key(&record, false).await?;
        let entry = Arc::new(KeyEntry::new(record).map_err(Error::internal)?);
        self.write()
            .insert(entry.record.id.as_str().into(), entry.clone());
        Ok((entry, new.key))
    }

    /// Revokes a key at once (the store first, then memory, so a failed write revokes
    /// nothing). `None`: no active key `viewer` can see has that id.
    pub async fn revoke(
        &self,
        viewer: &Principal,
        id: &str,
    ) -> Result<Option<Arc<KeyEntry>>, Error> {
        let entry = self.read().get(id).cloned();
        let Some(entry) = entry.filter(|e| viewer.sees(&e.record.team)) else {
            return Ok(None);
        };
        if entry.role() == Role::Owner {
            let owners = self
                .read()
                .values()
                .filter(|k| k.role() == Role::Owner)
                .count();
            if owners <= 1 {
                return Err(Error::Conflict(
                    "this is the last owner key; create another owner key before revoking it"
                        .into(),
                ));
            }
        }
        self.store.revoke_key(id).await?;
        self.write().remove(id);
        Ok(Some(entry))
    }

    /// Re-reads the active keys after another gateway on a shared store changed one (or on a
    /// resync): a key revoked there is refused here from then on, one created there accepted.
    /// Entries that did not change keep their last-use counters.
    pub async fn resync_keys(&self) -> Result<(), StoreError> {
        let fresh: HashMap<String, KeyRecord> = self
            .store
            .keys()
            .await?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let ids: HashSet<String> = fresh.keys().cloned().collect();
        let mut entries = Vec::new();
        for (id, record) in fresh {
            let kept = self.read().get(id.as_str()).is_some_and(|e| {
                let r = &e.record;
                (&r.team, &r.role, &r.hash, r.expires_at)
                    == (&record.team, &record.role, &record.hash, record.expires_at)
            });
            if !kept {
                entries.push(KeyEntry::new(record)?);
            }
        }
        let mut keys = self.write();
        keys.retain(|id, _| ids.contains(&**id));
        for entry in entries {
            keys.insert(entry.record.id.as_str().into(), Arc::new(entry));
        }
        Ok(())
    }

    /// Re-reads the teams (another gateway may have created one).
    pub async fn resync_teams(&self) -> Result<(), StoreError> {
        let teams = self.store.teams().await?;
        let mut known = self.teams.write().unwrap_or_else(|e| e.into_inner());
        known.extend(teams.into_iter().map(|t| t.id));
        Ok(())
    }

    /// Writes last-use times that changed to the store, each key at most once a minute.
    pub async fn flush_last_used(&self) {
        let now = unix_now();
        let due: Vec<(String, DateTime<Utc>)> = self
            .read()
            .values()
            .filter_map(|k| {
                let used = k.last_used.load(Ordering::Relaxed);
                let flushed = k.flushed.load(Ordering::Relaxed);
                (used > flushed && (flushed == 0 || now - flushed >= 60)).then(|| {
                    k.flushed.store(used, Ordering::Relaxed);
                    (
                        k.record.id.clone(),
                        DateTime::from_timestamp(used, 0).unwrap_or_default(),
                    )
                })
            })
            .collect();
        if !due.is_empty() {
            if let Err(e) = self.store.touch_keys(&due).await {
                tracing::warn!(error = %e, "could not record when API keys were last used");
            }
        }
    }
}

/// Moves the failure window to `minute`.
fn roll(r: &mut (i64, u64, u64), minute: i64) {
    match minute - r.0 {
        0 => {}
        1 => *r = (minute, 0, r.1),
        _ => *r = (minute, 0, 0),
    }
}

/// The token verifier: `TOKEN_SECRET`, or a secret generated once into the store (so tokens
/// survive restarts and every gateway on the store accepts them), and the identity provider's
/// keys when configured.
async fn load_tokens(store: &dyn Store, config: &Config) -> Result<Tokens, LoadError> {
    let secret = match &config.token_secret {
        Some(s) => s.expose().to_string(),
        None => {
            let fresh = keys::generate().key;
            store.secret("token", &fresh).await?
        }
    };
    let jwt = &config.jwt;
    let (doc, path) = match (&jwt.public_key, &jwt.jwks) {
        (Some(p), _) => (Some(read_source(p, jwt.jwks_ca.as_deref()).await?), p),
        (None, Some(p)) => (Some(read_source(p, jwt.jwks_ca.as_deref()).await?), p),
        (None, None) => (None, &config.data_dir),
    };
    let external = match doc {
        None => None,
        Some(doc) => {
            let keys = if jwt.public_key.is_some() {
                ExternalKeys::Pem(&doc)
            } else {
                ExternalKeys::Jwks(&doc)
            };
            let ext = External::new(
                keys,
                jwt.issuer.clone(),
                jwt.audience.clone(),
                jwt.team_claim.clone(),
                jwt.role_claim.clone(),
            )
            .map_err(|message| LoadError::File {
                path: path.display().to_string(),
                message,
            })?;
            Some(ext)
        }
    };
    Ok(Tokens::new(
        secret.as_bytes(),
        config.auth_token_expiry,
        external,
    ))
}

/// A key file's contents, or a JWKS URL's document.
async fn read_source(path: &Path, ca: Option<&Path>) -> Result<Vec<u8>, LoadError> {
    let failed = |message: String| LoadError::File {
        path: path.display().to_string(),
        message,
    };
    match path.to_str().filter(|s| jwks::is_url(s)) {
        Some(url) => jwks::fetch(url, ca).await.map_err(failed),
        None => std::fs::read(path).map_err(|e| failed(e.to_string())),
    }
}

fn owner_record(id: String, name: &str, key: &str) -> KeyRecord {
    KeyRecord {
        id,
        team: DEFAULT_TEAM.into(),
        name: name.into(),
        role: Role::Owner.as_str().into(),
        hash: keys::hash(key.as_bytes()),
        created_at: crate::model::now(),
        expires_at: None,
        last_used_at: None,
    }
}

/// The token of a `Bearer` authorization value.
fn bearer(v: &[u8]) -> Option<&[u8]> {
    let v = v.trim_ascii();
    (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| v[7..].trim_ascii())
}

/// Writes the first owner key where the README's quick start reads it, readable by the
/// gateway's user only.
fn write_admin_key(data_dir: &Path, key: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join("admin.key");
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(key.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_values() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
    }
}
