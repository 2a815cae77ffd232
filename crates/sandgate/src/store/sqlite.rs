//! SQLite implementation of `Store` (sqlx, WAL mode), with schema migrations by `user_version`.

use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::{AuditFilter, AuditRecord, KeyRecord, PortProbe, Store, StoreError, TeamRecord};
use crate::model::{Sandbox, DEFAULT_TEAM};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL
);
INSERT INTO teams (id, name, created_at) VALUES ('default', 'default', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id),
    owner TEXT NOT NULL,
    name TEXT,
    runtime TEXT NOT NULL,
    mode TEXT NOT NULL,
    dev_server INTEGER NOT NULL,
    command TEXT NOT NULL,
    env TEXT NOT NULL,
    limits TEXT NOT NULL DEFAULT '{}',
    port INTEGER,
    allocated_port INTEGER,
    status TEXT NOT NULL,
    status_reason TEXT,
    backend_ref TEXT,
    ip_address TEXT,
    netns_pid INTEGER,
    generation INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE UNIQUE INDEX sandboxes_owner_name ON sandboxes(owner, name) WHERE name IS NOT NULL;
CREATE UNIQUE INDEX sandboxes_allocated_port ON sandboxes(allocated_port) WHERE allocated_port IS NOT NULL;
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id),
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    hash BLOB NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    last_used_at TEXT,
    revoked_at TEXT
);
CREATE INDEX api_keys_team ON api_keys(team_id);
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN public INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sandboxes ADD COLUMN public_ports TEXT NOT NULL DEFAULT '[]';
ALTER TABLE sandboxes ADD COLUMN preview_generation INTEGER NOT NULL DEFAULT 0;
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    team_id TEXT,
    subject TEXT,
    client TEXT,
    action TEXT NOT NULL,
    target TEXT,
    result TEXT NOT NULL,
    details TEXT
);
CREATE INDEX audit_at ON audit(at);
CREATE INDEX audit_team_at ON audit(team_id, at);
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN keep_prefix INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE sandboxes ADD COLUMN idle_timeout INTEGER;
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN network TEXT NOT NULL DEFAULT 'none';
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN health_path TEXT;
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN pool TEXT;
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN replicas INTEGER NOT NULL DEFAULT 1;
ALTER TABLE sandboxes ADD COLUMN replica_of TEXT;
"#,
];

pub struct SqliteStore {
    pool: SqlitePool,
    /// Serialises allocations so two creates never race for one port.
    alloc: tokio::sync::Mutex<()>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` and brings its schema up to date.
    pub async fn open(url: &str) -> Result<SqliteStore, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        let store = SqliteStore {
            pool,
            alloc: tokio::sync::Mutex::new(()),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *conn)
            .await?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            // Executor::execute on &str keeps this future Send (raw_sql's is not).
            sqlx::Executor::execute(&mut *tx, *sql).await?;
            let pragma = format!("PRAGMA user_version = {}", i + 1);
            sqlx::Executor::execute(&mut *tx, pragma.as_str()).await?;
            tx.commit().await?;
        }
        Ok(())
    }
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn corrupt(id: &str, message: impl ToString) -> StoreError {
    StoreError::Corrupt {
        id: id.to_string(),
        message: message.to_string(),
    }
}

fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Sandbox, StoreError> {
    let id: String = row.try_get("id")?;
    let time = |col: &str| -> Result<DateTime<Utc>, StoreError> {
        let s: String = row.try_get(col)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| corrupt(&id, e))
    };
    let port = |col: &str| -> Result<Option<u16>, StoreError> {
        let p: Option<i64> = row.try_get(col)?;
        p.map(|p| u16::try_from(p).map_err(|e| corrupt(&id, e)))
            .transpose()
    };
    let env: String = row.try_get("env")?;
    let limits: String = row.try_get("limits")?;
    let mode: String = row.try_get("mode")?;
    let status: String = row.try_get("status")?;
    let public_ports: String = row.try_get("public_ports")?;
    Ok(Sandbox {
        team: row.try_get("team_id")?,
        owner: row.try_get("owner")?,
        name: row.try_get("name")?,
        runtime: row.try_get("runtime")?,
        mode: mode.parse().map_err(|e: String| corrupt(&id, e))?,
        dev_server: row.try_get("dev_server")?,
        command: row.try_get("command")?,
        env: serde_json::from_str(&env).map_err(|e| corrupt(&id, e))?,
        limits: serde_json::from_str(&limits).map_err(|e| corrupt(&id, e))?,
        port: port("port")?,
        allocated_port: port("allocated_port")?,
        status: status.parse().map_err(|e: String| corrupt(&id, e))?,
        status_reason: row.try_get("status_reason")?,
        backend_ref: row.try_get("backend_ref")?,
        ip_address: row.try_get("ip_address")?,
        netns_pid: row.try_get("netns_pid")?,
        generation: row.try_get("generation")?,
        public: row.try_get("public")?,
        public_ports: serde_json::from_str(&public_ports).map_err(|e| corrupt(&id, e))?,
        preview_generation: row.try_get("preview_generation")?,
        keep_prefix: row.try_get("keep_prefix")?,
        labels: {
            let labels: String = row.try_get("labels")?;
            serde_json::from_str(&labels).map_err(|e| corrupt(&id, e))?
        },
        idle_timeout: {
            let t: Option<i64> = row.try_get("idle_timeout")?;
            t.map(|t| u64::try_from(t).map_err(|e| corrupt(&id, e)))
                .transpose()?
        },
        network: {
            let n: String = row.try_get("network")?;
            crate::model::Network::parse(&n)
                .ok_or_else(|| corrupt(&id, format!("unknown network {n:?}")))?
        },
        health_path: row.try_get("health_path")?,
        pool: row.try_get("pool")?,
        replicas: {
            let n: i64 = row.try_get("replicas")?;
            u32::try_from(n).map_err(|e| corrupt(&id, e))?
        },
        replica_of: row.try_get("replica_of")?,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
        id,
    })
}

fn parse_time(id: &str, s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| corrupt(id, e))
}

fn key_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<KeyRecord, StoreError> {
    let id: String = row.try_get("id")?;
    let hash: Vec<u8> = row.try_get("hash")?;
    let hash: [u8; 32] = hash
        .try_into()
        .map_err(|_| corrupt(&id, "key hash is not 32 bytes"))?;
    let opt_time = |col: &str| -> Result<Option<DateTime<Utc>>, StoreError> {
        let s: Option<String> = row.try_get(col)?;
        s.map(|s| parse_time(&id, &s)).transpose()
    };
    let created: String = row.try_get("created_at")?;
    Ok(KeyRecord {
        team: row.try_get("team_id")?,
        name: row.try_get("name")?,
        role: row.try_get("role")?,
        hash,
        created_at: parse_time(&id, &created)?,
        expires_at: opt_time("expires_at")?,
        last_used_at: opt_time("last_used_at")?,
        id,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create(
        &self,
        sb: &mut Sandbox,
        port_range: Option<RangeInclusive<u16>>,
        probe: PortProbe<'_>,
    ) -> Result<(), StoreError> {
        let _guard = self.alloc.lock().await;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut allocated = sb.allocated_port;
        if let Some(range) = port_range {
            let taken: Vec<i64> = sqlx::query_scalar(
                "SELECT allocated_port FROM sandboxes WHERE allocated_port BETWEEN ? AND ?",
            )
            .bind(*range.start() as i64)
            .bind(*range.end() as i64)
            .fetch_all(&mut *tx)
            .await?;
            let cursor: Option<String> =
                sqlx::query_scalar("SELECT value FROM meta WHERE key = 'port_cursor'")
                    .fetch_optional(&mut *tx)
                    .await?;
            // Start after the last port handed out, so a just-released port is reused last.
            let start = cursor
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| range.contains(c))
                .map_or(*range.start(), |c| {
                    if c == *range.end() {
                        *range.start()
                    } else {
                        c + 1
                    }
                });
            let len = (*range.end() - *range.start()) as u32 + 1;
            let chosen = (0..len)
                .map(|i| {
                    let off = (start - *range.start()) as u32 + i;
                    *range.start() + (off % len) as u16
                })
                .find(|p| !taken.contains(&(*p as i64)) && probe(*p))
                .ok_or_else(|| {
                    StoreError::PortsExhausted(format!("{}-{}", range.start(), range.end()))
                })?;
            allocated = Some(chosen);
            sqlx::query(
                "INSERT INTO meta (key, value) VALUES ('port_cursor', ?) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )
            .bind(chosen.to_string())
            .execute(&mut *tx)
            .await?;
        }
        let env = serde_json::to_string(&sb.env).map_err(|e| corrupt(&sb.id, e))?;
        let team = if sb.team.is_empty() {
            DEFAULT_TEAM
        } else {
            &sb.team
        };
        let res = sqlx::query(
            "INSERT INTO sandboxes (id, team_id, owner, name, runtime, mode, dev_server, command, \
             env, limits, port, allocated_port, status, status_reason, backend_ref, ip_address, \
             netns_pid, generation, created_at, updated_at, public, public_ports, \
             preview_generation, keep_prefix, labels, idle_timeout, network, health_path, pool, \
             replicas, replica_of) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&sb.id)
        .bind(team)
        .bind(&sb.owner)
        .bind(&sb.name)
        .bind(&sb.runtime)
        .bind(sb.mode.as_str())
        .bind(sb.dev_server)
        .bind(&sb.command)
        .bind(env)
        .bind(serde_json::to_string(&sb.limits).map_err(|e| corrupt(&sb.id, e))?)
        .bind(sb.port.map(i64::from))
        .bind(allocated.map(i64::from))
        .bind(sb.status.as_str())
        .bind(&sb.status_reason)
        .bind(&sb.backend_ref)
        .bind(&sb.ip_address)
        .bind(sb.netns_pid)
        .bind(sb.generation)
        .bind(ts(&sb.created_at))
        .bind(ts(&sb.updated_at))
        .bind(sb.public)
        .bind(serde_json::to_string(&sb.public_ports).map_err(|e| corrupt(&sb.id, e))?)
        .bind(sb.preview_generation)
        .bind(sb.keep_prefix)
        .bind(serde_json::to_string(&sb.labels).map_err(|e| corrupt(&sb.id, e))?)
        .bind(sb.idle_timeout.map(|t| t as i64))
        .bind(sb.network.as_str())
        .bind(&sb.health_path)
        .bind(&sb.pool)
        .bind(i64::from(sb.replicas))
        .bind(&sb.replica_of)
        .execute(&mut *tx)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) && sb.name.is_some() => {
                return Err(StoreError::NameTaken(sb.path().unwrap_or_default()))
            }
            other => other?,
        };
        tx.commit().await?;
        sb.allocated_port = allocated;
        Ok(())
    }

    async fn update(&self, sb: &Sandbox) -> Result<(), StoreError> {
        let env = serde_json::to_string(&sb.env).map_err(|e| corrupt(&sb.id, e))?;
        sqlx::query(
            "UPDATE sandboxes SET command = ?, env = ?, port = ?, status = ?, status_reason = ?, \
             backend_ref = ?, ip_address = ?, netns_pid = ?, generation = ?, updated_at = ?, \
             public = ?, public_ports = ?, preview_generation = ?, keep_prefix = ?, mode = ?, \
             labels = ?, idle_timeout = ? WHERE id = ?",
        )
        .bind(&sb.command)
        .bind(env)
        .bind(sb.port.map(i64::from))
        .bind(sb.status.as_str())
        .bind(&sb.status_reason)
        .bind(&sb.backend_ref)
        .bind(&sb.ip_address)
        .bind(sb.netns_pid)
        .bind(sb.generation)
        .bind(ts(&sb.updated_at))
        .bind(sb.public)
        .bind(serde_json::to_string(&sb.public_ports).map_err(|e| corrupt(&sb.id, e))?)
        .bind(sb.preview_generation)
        .bind(sb.keep_prefix)
        .bind(sb.mode.as_str())
        .bind(serde_json::to_string(&sb.labels).map_err(|e| corrupt(&sb.id, e))?)
        .bind(sb.idle_timeout.map(|t| t as i64))
        .bind(&sb.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn claim(&self, sb: &Sandbox) -> Result<bool, StoreError> {
        let team = if sb.team.is_empty() {
            DEFAULT_TEAM
        } else {
            &sb.team
        };
        let res = sqlx::query(
            "UPDATE sandboxes SET team_id = ?, owner = ?, name = ?, mode = ?, public = ?, \
             public_ports = ?, keep_prefix = ?, labels = ?, idle_timeout = ?, health_path = ?, \
             created_at = ?, updated_at = ?, pool = NULL WHERE id = ? AND pool IS NOT NULL",
        )
        .bind(team)
        .bind(&sb.owner)
        .bind(&sb.name)
        .bind(sb.mode.as_str())
        .bind(sb.public)
        .bind(serde_json::to_string(&sb.public_ports).map_err(|e| corrupt(&sb.id, e))?)
        .bind(sb.keep_prefix)
        .bind(serde_json::to_string(&sb.labels).map_err(|e| corrupt(&sb.id, e))?)
        .bind(sb.idle_timeout.map(|t| t as i64))
        .bind(&sb.health_path)
        .bind(ts(&sb.created_at))
        .bind(ts(&sb.updated_at))
        .bind(&sb.id)
        .execute(&self.pool)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) && sb.name.is_some() => {
                Err(StoreError::NameTaken(sb.path().unwrap_or_default()))
            }
            Err(e) => Err(e.into()),
            Ok(done) => Ok(done.rows_affected() == 1),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<Sandbox>, StoreError> {
        sqlx::query("SELECT * FROM sandboxes WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(from_row)
            .transpose()
    }

    async fn list(&self) -> Result<Vec<Sandbox>, StoreError> {
        sqlx::query("SELECT * FROM sandboxes ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(from_row)
            .collect()
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sandboxes WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn put_key(&self, key: &KeyRecord, replace: bool) -> Result<(), StoreError> {
        let verb = if replace {
            "INSERT OR REPLACE"
        } else {
            "INSERT"
        };
        let sql = format!(
            "{verb} INTO api_keys (id, team_id, name, role, hash, created_at, expires_at, \
             last_used_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)"
        );
        sqlx::query(&sql)
            .bind(&key.id)
            .bind(&key.team)
            .bind(&key.name)
            .bind(&key.role)
            .bind(&key.hash[..])
            .bind(ts(&key.created_at))
            .bind(key.expires_at.as_ref().map(ts))
            .bind(key.last_used_at.as_ref().map(ts))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        sqlx::query("SELECT * FROM api_keys WHERE revoked_at IS NULL ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(key_from_row)
            .collect()
    }

    async fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(ts(&crate::model::now()))
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn touch_keys(&self, used: &[(String, DateTime<Utc>)]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for (id, at) in used {
            sqlx::query("UPDATE api_keys SET last_used_at = ? WHERE id = ?")
                .bind(ts(at))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_team(&self, id: &str) -> Result<TeamRecord, StoreError> {
        let team = TeamRecord {
            id: id.to_string(),
            created_at: crate::model::now(),
        };
        let res = sqlx::query("INSERT INTO teams (id, name, created_at) VALUES (?, ?, ?)")
            .bind(&team.id)
            .bind(&team.id)
            .bind(ts(&team.created_at))
            .execute(&self.pool)
            .await;
        match res {
            Err(e) if is_unique_violation(&e) => Err(StoreError::TeamExists(id.to_string())),
            other => other.map(|_| team).map_err(StoreError::from),
        }
    }

    async fn teams(&self) -> Result<Vec<TeamRecord>, StoreError> {
        let rows = sqlx::query("SELECT id, created_at FROM teams ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let created: String = row.try_get("created_at")?;
                Ok(TeamRecord {
                    created_at: parse_time(&id, &created)?,
                    id,
                })
            })
            .collect()
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for r in records {
            sqlx::query(
                "INSERT INTO audit (at, team_id, subject, client, action, target, result, details) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(ts(&r.at))
            .bind(&r.team)
            .bind(&r.subject)
            .bind(&r.client)
            .bind(&r.action)
            .bind(&r.target)
            .bind(&r.result)
            .bind(&r.details)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM audit WHERE (?1 IS NULL OR team_id = ?1) AND (?2 IS NULL OR at >= ?2) \
             AND (?3 IS NULL OR action = ?3) AND (?4 IS NULL OR target = ?4) \
             ORDER BY id LIMIT ?5",
        )
        .bind(&f.team)
        .bind(f.since.as_ref().map(ts))
        .bind(&f.action)
        .bind(&f.target)
        .bind(f.limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.try_get("id")?;
                let at: String = row.try_get("at")?;
                Ok(AuditRecord {
                    id,
                    at: parse_time(&id.to_string(), &at)?,
                    team: row.try_get("team_id")?,
                    subject: row.try_get("subject")?,
                    client: row.try_get("client")?,
                    action: row.try_get("action")?,
                    target: row.try_get("target")?,
                    result: row.try_get("result")?,
                    details: row.try_get("details")?,
                })
            })
            .collect()
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM audit WHERE at < ?")
            .bind(ts(&before))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn secret(&self, name: &str, fresh: &str) -> Result<String, StoreError> {
        let key = format!("secret:{name}");
        sqlx::query("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)")
            .bind(&key)
            .bind(fresh)
            .execute(&self.pool)
            .await?;
        Ok(sqlx::query_scalar("SELECT value FROM meta WHERE key = ?")
            .bind(&key)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{new_id, Mode, Status};

    fn sandbox(name: Option<&str>) -> Sandbox {
        let now = crate::model::now();
        Sandbox {
            id: new_id(),
            team: DEFAULT_TEAM.into(),
            owner: "alice".into(),
            name: name.map(str::to_string),
            runtime: "python".into(),
            mode: Mode::Persistent,
            dev_server: true,
            command: "true".into(),
            env: [("A".to_string(), "1".to_string())].into(),
            limits: Default::default(),
            port: Some(3000),
            allocated_port: None,
            status: Status::Creating,
            status_reason: None,
            backend_ref: None,
            ip_address: None,
            netns_pid: None,
            generation: 0,
            public: false,
            public_ports: vec![8080],
            preview_generation: 0,
            keep_prefix: false,
            labels: Default::default(),
            idle_timeout: None,
            network: crate::model::Network::None,
            health_path: None,
            pool: None,
            replicas: 1,
            replica_of: None,
            created_at: now,
            updated_at: now,
        }
    }

    async fn open(dir: &tempfile::TempDir) -> SqliteStore {
        let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
        SqliteStore::open(&url).await.unwrap()
    }

    #[tokio::test]
    async fn ports_are_unique_survive_reopen_and_are_released_on_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let range = Some(40000..=40002);
        let all = |_: u16| true;
        let mut a = sandbox(None);
        let mut b = sandbox(None);
        store.create(&mut a, range.clone(), &all).await.unwrap();
        store.create(&mut b, range.clone(), &all).await.unwrap();
        assert_ne!(a.allocated_port, b.allocated_port);
        drop(store);

        // A restart sees the same allocations and hands out the remaining port only.
        let store = open(&dir).await;
        let mut c = sandbox(None);
        store.create(&mut c, range.clone(), &all).await.unwrap();
        let mut d = sandbox(None);
        let err = store.create(&mut d, range.clone(), &all).await.unwrap_err();
        assert!(matches!(err, StoreError::PortsExhausted(_)), "{err}");
        assert!(
            store.get(&d.id).await.unwrap().is_none(),
            "failed create left a row"
        );

        store.delete(&a.id).await.unwrap();
        store.create(&mut d, range.clone(), &all).await.unwrap();
        assert_eq!(d.allocated_port, a.allocated_port);
        let listed = store.list().await.unwrap();
        assert_eq!(listed.len(), 3);
        assert_eq!(store.get(&b.id).await.unwrap().unwrap(), b);
    }

    #[tokio::test]
    async fn probe_skips_busy_ports_and_names_are_unique_per_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let mut a = sandbox(Some("web"));
        store
            .create(&mut a, Some(40000..=40005), &|p| p != 40000)
            .await
            .unwrap();
        assert_eq!(a.allocated_port, Some(40001));
        let mut b = sandbox(Some("web"));
        let err = store
            .create(&mut b, Some(40000..=40005), &|_| true)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NameTaken(ref p) if p == "alice/web"));
        b.owner = "bob".into();
        store.create(&mut b, None, &|_| true).await.unwrap();
        assert_eq!(b.allocated_port, None);
    }

    #[tokio::test]
    async fn audit_records_filter_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let rec = |team: &str, action: &str, days_ago: i64| AuditRecord {
            id: 0,
            at: crate::model::now() - chrono::Duration::days(days_ago),
            team: Some(team.into()),
            subject: Some("k".into()),
            client: Some("127.0.0.1".into()),
            action: action.into(),
            target: Some("sb-x".into()),
            result: "ok".into(),
            details: None,
        };
        store
            .append_audit(&[
                rec("a", "sandbox.create", 100),
                rec("a", "sandbox.delete", 0),
                rec("b", "sandbox.create", 0),
            ])
            .await
            .unwrap();
        let all = AuditFilter {
            limit: 10,
            ..AuditFilter::default()
        };
        assert_eq!(store.audit(&all).await.unwrap().len(), 3);
        let a = AuditFilter {
            team: Some("a".into()),
            action: Some("sandbox.create".into()),
            ..all.clone()
        };
        assert_eq!(store.audit(&a).await.unwrap().len(), 1);
        let pruned = store
            .prune_audit(crate::model::now() - chrono::Duration::days(90))
            .await
            .unwrap();
        assert_eq!(pruned, 1);
        let left = store.audit(&all).await.unwrap();
        assert_eq!(left.len(), 2);
        assert!(left[0].id < left[1].id);
    }

    #[tokio::test]
    async fn update_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let mut a = sandbox(None);
        store.create(&mut a, None, &|_| true).await.unwrap();
        a.status = Status::Running;
        a.backend_ref = Some("{\"pid\":1}".into());
        a.generation = 3;
        a.public = true;
        a.preview_generation = 2;
        store.update(&a).await.unwrap();
        assert_eq!(store.get(&a.id).await.unwrap().unwrap(), a);
    }

    /// A warm sandbox is claimed by rewriting who it belongs to, once: the claim may not take
    /// a name another sandbox of that owner has, and `update` never changes ownership.
    #[tokio::test]
    async fn a_claim_rewrites_ownership_once_and_keeps_names_unique() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let mut named = sandbox(Some("web"));
        store.create(&mut named, None, &|_| true).await.unwrap();
        let mut pooled = sandbox(None);
        pooled.pool = Some("shell".into());
        store.create(&mut pooled, None, &|_| true).await.unwrap();
        assert_eq!(store.get(&pooled.id).await.unwrap().unwrap(), pooled);

        let mut claim = pooled.clone();
        claim.pool = None;
        claim.owner = named.owner.clone();
        claim.name = named.name.clone();
        let err = store.claim(&claim).await.unwrap_err();
        assert!(matches!(err, StoreError::NameTaken(_)), "{err}");
        assert_eq!(store.get(&pooled.id).await.unwrap().unwrap(), pooled);

        // `update` leaves ownership alone.
        let mut stale = pooled.clone();
        stale.owner = "mallory".into();
        stale.pool = None;
        store.update(&stale).await.unwrap();
        assert_eq!(store.get(&pooled.id).await.unwrap().unwrap(), pooled);

        claim.name = Some("api".into());
        claim.owner = "alice".into();
        claim.health_path = Some("/healthz".into());
        assert!(store.claim(&claim).await.unwrap());
        assert_eq!(store.get(&pooled.id).await.unwrap().unwrap(), claim);
        assert!(!store.claim(&claim).await.unwrap(), "claimed once only");
        assert!(
            !store.claim(&named).await.unwrap(),
            "a user's sandbox is never claimed"
        );
    }
}
