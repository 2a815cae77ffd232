//! The SQL implementation of `Store`, written once for both engines (see `engine`): SQLite
//! (the embedded default: WAL mode, schema version in `PRAGMA user_version`) and PostgreSQL
//! (shared by replicas: schema version in a `schema_version` table, every write to a sandbox,
//! key or team announced with `NOTIFY sandgate`, see `pg`).

use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::engine::{query, Engine, Pool, Query, Row, Tx, MIGRATIONS};
use super::{
    AuditFilter, AuditRecord, Change, KeyRecord, PortProbe, Store, StoreError, TeamRecord,
};
use crate::model::{Sandbox, DEFAULT_TEAM};

/// The advisory lock (PostgreSQL) that serialises migrations and port allocations across
/// every gateway on the database.
const WRITE_LOCK: i64 = 0x5a6e_6761_7465_0001;

/// A store on SQLite or PostgreSQL, chosen by the URL's scheme.
pub struct SqlStore {
    pool: Pool,
    /// Serialises this process's allocations so two creates never race for one port (across
    /// processes: SQLite's write lock, PostgreSQL's [`WRITE_LOCK`]).
    alloc: tokio::sync::Mutex<()>,
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl SqlStore {
    /// Opens (creating if needed) the database at `url` (`sqlite:…` or `postgres://…`) and
    /// brings its schema up to date.
    pub async fn open(url: &str) -> Result<SqlStore, StoreError> {
        let pool = if is_postgres(url) {
            let opts = PgConnectOptions::from_str(url)?;
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(opts)
                    .await?,
            )
        } else {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10));
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(4)
                    .connect_with(opts)
                    .await?,
            )
        };
        let store = SqlStore {
            pool,
            alloc: tokio::sync::Mutex::new(()),
        };
        store.migrate().await?;
        Ok(store)
    }

    pub fn engine(&self) -> Engine {
        self.pool.engine()
    }

    /// Applies the migrations not yet applied: on SQLite each in its own transaction, all on
    /// one connection (another connection that saw the schema mid-way would keep a stale
    /// column list for `SELECT *`); on PostgreSQL all in one transaction under
    /// [`WRITE_LOCK`] (replicas starting together migrate once).
    async fn migrate(&self) -> Result<(), StoreError> {
        match &self.pool {
            Pool::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let version: i64 = sqlx::query_scalar("PRAGMA user_version")
                    .fetch_one(&mut *conn)
                    .await?;
                for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                    let sql = Engine::Sqlite.dialect(sql);
                    // Executor::execute on &str keeps this future Send (raw_sql's is not).
                    sqlx::Executor::execute(&mut *tx, sql.as_str()).await?;
                    let pragma = format!("PRAGMA user_version = {}", i + 1);
                    sqlx::Executor::execute(&mut *tx, pragma.as_str()).await?;
                    tx.commit().await?;
                }
            }
            Pool::Postgres(_) => {
                let mut tx = self.pool.begin().await?;
                tx.execute(query("SELECT pg_advisory_xact_lock(?)").bind(WRITE_LOCK))
                    .await?;
                tx.execute_script(
                    "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL); \
                     INSERT INTO schema_version (version) SELECT 0 \
                     WHERE NOT EXISTS (SELECT 1 FROM schema_version)",
                )
                .await?;
                let version: i64 = tx
                    .fetch_all(query("SELECT version FROM schema_version"))
                    .await?
                    .first()
                    .map(|r| r.get("version"))
                    .transpose()?
                    .unwrap_or(0);
                for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                    tx.execute_script(&Engine::Postgres.dialect(sql)).await?;
                    let done = format!("UPDATE schema_version SET version = {}", i + 1);
                    tx.execute_script(&done).await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Tells the other gateways on this database that a record changed (PostgreSQL only).
    async fn announce(&self, tx: Option<&mut Tx>, change: Change) -> Result<(), StoreError> {
        if self.engine() != Engine::Postgres {
            return Ok(());
        }
        let q = query("SELECT pg_notify(?, ?)")
            .bind(super::pg::CHANNEL)
            .bind(change.to_payload());
        match tx {
            Some(tx) => tx.execute(q).await?,
            None => self.pool.execute(q).await?,
        };
        Ok(())
    }

    /// The PostgreSQL pool, for the change listener and the lease.
    pub(super) fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.pool {
            Pool::Postgres(p) => Some(p),
            Pool::Sqlite(_) => None,
        }
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

fn json(id: &str, value: &impl serde::Serialize) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| corrupt(id, e))
}

fn from_row(row: &Row) -> Result<Sandbox, StoreError> {
    let id: String = row.get("id")?;
    let time = |col: &str| -> Result<DateTime<Utc>, StoreError> {
        let s: String = row.get(col)?;
        parse_time(&id, &s)
    };
    let port = |col: &str| -> Result<Option<u16>, StoreError> {
        let p: Option<i64> = row.get(col)?;
        p.map(|p| u16::try_from(p).map_err(|e| corrupt(&id, e)))
            .transpose()
    };
    let mode: String = row.get("mode")?;
    let status: String = row.get("status")?;
    Ok(Sandbox {
        team: row.get("team_id")?,
        owner: row.get("owner")?,
        name: row.get("name")?,
        runtime: row.get("runtime")?,
        mode: mode.parse().map_err(|e: String| corrupt(&id, e))?,
        dev_server: row.get("dev_server")?,
        command: row.get("command")?,
        env: decode(row, &id, "env")?,
        limits: decode(row, &id, "limits")?,
        port: port("port")?,
        allocated_port: port("allocated_port")?,
        status: status.parse().map_err(|e: String| corrupt(&id, e))?,
        status_reason: row.get("status_reason")?,
        backend_ref: row.get("backend_ref")?,
        ip_address: row.get("ip_address")?,
        netns_pid: {
            let p: Option<i64> = row.get("netns_pid")?;
            p.map(|p| i32::try_from(p).map_err(|e| corrupt(&id, e)))
                .transpose()?
        },
        generation: row.get("generation")?,
        public: row.get("public")?,
        public_ports: decode(row, &id, "public_ports")?,
        preview_generation: row.get("preview_generation")?,
        keep_prefix: row.get("keep_prefix")?,
        labels: decode(row, &id, "labels")?,
        idle_timeout: {
            let t: Option<i64> = row.get("idle_timeout")?;
            t.map(|t| u64::try_from(t).map_err(|e| corrupt(&id, e)))
                .transpose()?
        },
        network: {
            let n: String = row.get("network")?;
            crate::model::Network::parse(&n)
                .ok_or_else(|| corrupt(&id, format!("unknown network {n:?}")))?
        },
        health_path: row.get("health_path")?,
        pool: row.get("pool")?,
        replicas: {
            let n: i64 = row.get("replicas")?;
            u32::try_from(n).map_err(|e| corrupt(&id, e))?
        },
        replica_of: row.get("replica_of")?,
        created_at: time("created_at")?,
        updated_at: time("updated_at")?,
        id,
    })
}

/// A JSON column.
fn decode<T: serde::de::DeserializeOwned>(row: &Row, id: &str, col: &str) -> Result<T, StoreError> {
    let s: String = row.get(col)?;
    serde_json::from_str(&s).map_err(|e| corrupt(id, e))
}

fn parse_time(id: &str, s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| corrupt(id, e))
}

fn key_from_row(row: &Row) -> Result<KeyRecord, StoreError> {
    let id: String = row.get("id")?;
    let hash: Vec<u8> = row.get("hash")?;
    let hash: [u8; 32] = hash
        .try_into()
        .map_err(|_| corrupt(&id, "key hash is not 32 bytes"))?;
    let opt_time = |col: &str| -> Result<Option<DateTime<Utc>>, StoreError> {
        let s: Option<String> = row.get(col)?;
        s.map(|s| parse_time(&id, &s)).transpose()
    };
    let created: String = row.get("created_at")?;
    Ok(KeyRecord {
        team: row.get("team_id")?,
        name: row.get("name")?,
        role: row.get("role")?,
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

/// The name a unique violation on a named sandbox means.
fn name_taken(e: sqlx::Error, sb: &Sandbox) -> StoreError {
    if is_unique_violation(&e) && sb.name.is_some() {
        StoreError::NameTaken(sb.path().unwrap_or_default())
    } else {
        e.into()
    }
}

/// The insert of one key; with `replace`, a key of the same id is rewritten whole (and active
/// again), as SQLite's `INSERT OR REPLACE` did.
fn key_insert(key: &KeyRecord, replace: bool) -> Query {
    let upsert = if replace {
        " ON CONFLICT(id) DO UPDATE SET team_id = excluded.team_id, name = excluded.name, \
         role = excluded.role, hash = excluded.hash, created_at = excluded.created_at, \
         expires_at = excluded.expires_at, last_used_at = excluded.last_used_at, \
         revoked_at = NULL"
    } else {
        ""
    };
    let sql = format!(
        "INSERT INTO api_keys (id, team_id, name, role, hash, created_at, expires_at, \
         last_used_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL){upsert}"
    );
    query(sql)
        .bind(&key.id)
        .bind(&key.team)
        .bind(&key.name)
        .bind(&key.role)
        .bind(&key.hash[..])
        .bind(ts(&key.created_at))
        .bind(key.expires_at.as_ref().map(ts))
        .bind(key.last_used_at.as_ref().map(ts))
}

#[async_trait]
impl Store for SqlStore {
    async fn create(
        &self,
        sb: &mut Sandbox,
        port_range: Option<RangeInclusive<u16>>,
        probe: PortProbe<'_>,
    ) -> Result<(), StoreError> {
        let _guard = self.alloc.lock().await;
        let mut tx = self.pool.begin().await?;
        if self.engine() == Engine::Postgres {
            tx.execute(query("SELECT pg_advisory_xact_lock(?)").bind(WRITE_LOCK))
                .await?;
        }
        let mut allocated = sb.allocated_port;
        if let Some(range) = port_range {
            let taken: Vec<i64> = tx
                .fetch_all(
                    query(
                        "SELECT allocated_port FROM sandboxes WHERE allocated_port BETWEEN ? AND ?",
                    )
                    .bind(*range.start() as i64)
                    .bind(*range.end() as i64),
                )
                .await?
                .iter()
                .map(|r| r.get("allocated_port"))
                .collect::<Result<_, _>>()?;
            let cursor: Option<String> = tx
                .fetch_all(query("SELECT value FROM meta WHERE key = 'port_cursor'"))
                .await?
                .first()
                .map(|r| r.get("value"))
                .transpose()?;
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
            tx.execute(
                query(
                    "INSERT INTO meta (key, value) VALUES ('port_cursor', ?) \
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                )
                .bind(chosen.to_string()),
            )
            .await?;
        }
        let team = if sb.team.is_empty() {
            DEFAULT_TEAM
        } else {
            &sb.team
        };
        let insert = query(
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
        .bind(json(&sb.id, &sb.env)?)
        .bind(json(&sb.id, &sb.limits)?)
        .bind(sb.port.map(i64::from))
        .bind(allocated.map(i64::from))
        .bind(sb.status.as_str())
        .bind(&sb.status_reason)
        .bind(&sb.backend_ref)
        .bind(&sb.ip_address)
        .bind(sb.netns_pid.map(i64::from))
        .bind(sb.generation)
        .bind(ts(&sb.created_at))
        .bind(ts(&sb.updated_at))
        .bind(sb.public)
        .bind(json(&sb.id, &sb.public_ports)?)
        .bind(sb.preview_generation)
        .bind(sb.keep_prefix)
        .bind(json(&sb.id, &sb.labels)?)
        .bind(sb.idle_timeout.map(|t| t as i64))
        .bind(sb.network.as_str())
        .bind(&sb.health_path)
        .bind(&sb.pool)
        .bind(i64::from(sb.replicas))
        .bind(&sb.replica_of);
        tx.execute(insert).await.map_err(|e| name_taken(e, sb))?;
        self.announce(Some(&mut tx), Change::Sandbox(sb.id.clone()))
            .await?;
        tx.commit().await?;
        sb.allocated_port = allocated;
        Ok(())
    }

    async fn update(&self, sb: &Sandbox) -> Result<(), StoreError> {
        let q = query(
            "UPDATE sandboxes SET command = ?, env = ?, port = ?, status = ?, status_reason = ?, \
             backend_ref = ?, ip_address = ?, netns_pid = ?, generation = ?, updated_at = ?, \
             public = ?, public_ports = ?, preview_generation = ?, keep_prefix = ?, mode = ?, \
             labels = ?, idle_timeout = ? WHERE id = ?",
        )
        .bind(&sb.command)
        .bind(json(&sb.id, &sb.env)?)
        .bind(sb.port.map(i64::from))
        .bind(sb.status.as_str())
        .bind(&sb.status_reason)
        .bind(&sb.backend_ref)
        .bind(&sb.ip_address)
        .bind(sb.netns_pid.map(i64::from))
        .bind(sb.generation)
        .bind(ts(&sb.updated_at))
        .bind(sb.public)
        .bind(json(&sb.id, &sb.public_ports)?)
        .bind(sb.preview_generation)
        .bind(sb.keep_prefix)
        .bind(sb.mode.as_str())
        .bind(json(&sb.id, &sb.labels)?)
        .bind(sb.idle_timeout.map(|t| t as i64))
        .bind(&sb.id);
        self.pool.execute(q).await?;
        self.announce(None, Change::Sandbox(sb.id.clone())).await
    }

    async fn claim(&self, sb: &Sandbox) -> Result<bool, StoreError> {
        let team = if sb.team.is_empty() {
            DEFAULT_TEAM
        } else {
            &sb.team
        };
        let q = query(
            "UPDATE sandboxes SET team_id = ?, owner = ?, name = ?, mode = ?, public = ?, \
             public_ports = ?, keep_prefix = ?, labels = ?, idle_timeout = ?, health_path = ?, \
             created_at = ?, updated_at = ?, pool = NULL WHERE id = ? AND pool IS NOT NULL",
        )
        .bind(team)
        .bind(&sb.owner)
        .bind(&sb.name)
        .bind(sb.mode.as_str())
        .bind(sb.public)
        .bind(json(&sb.id, &sb.public_ports)?)
        .bind(sb.keep_prefix)
        .bind(json(&sb.id, &sb.labels)?)
        .bind(sb.idle_timeout.map(|t| t as i64))
        .bind(&sb.health_path)
        .bind(ts(&sb.created_at))
        .bind(ts(&sb.updated_at))
        .bind(&sb.id);
        let claimed = self.pool.execute(q).await.map_err(|e| name_taken(e, sb))? == 1;
        if claimed {
            self.announce(None, Change::Sandbox(sb.id.clone())).await?;
        }
        Ok(claimed)
    }

    async fn get(&self, id: &str) -> Result<Option<Sandbox>, StoreError> {
        self.pool
            .fetch_optional(query("SELECT * FROM sandboxes WHERE id = ?").bind(id))
            .await?
            .as_ref()
            .map(from_row)
            .transpose()
    }

    async fn list(&self) -> Result<Vec<Sandbox>, StoreError> {
        self.pool
            .fetch_all(query("SELECT * FROM sandboxes ORDER BY created_at, id"))
            .await?
            .iter()
            .map(from_row)
            .collect()
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.pool
            .execute(query("DELETE FROM sandboxes WHERE id = ?").bind(id))
            .await?;
        self.announce(None, Change::Sandbox(id.to_string())).await
    }

    async fn put_key(&self, key: &KeyRecord, replace: bool) -> Result<(), StoreError> {
        self.pool.execute(key_insert(key, replace)).await?;
        self.announce(None, Change::Key(key.id.clone())).await
    }

    async fn put_first_key(&self, key: &KeyRecord) -> Result<bool, StoreError> {
        // Under the write lock (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: the advisory lock that
        // also serialises allocations), so two gateways starting at once on an empty database
        // cannot both find no key and each create one.
        let mut tx = self.pool.begin().await?;
        if self.engine() == Engine::Postgres {
            tx.execute(query("SELECT pg_advisory_xact_lock(?)").bind(WRITE_LOCK))
                .await?;
        }
        let active = tx
            .fetch_all(query(
                "SELECT id FROM api_keys WHERE revoked_at IS NULL LIMIT 1",
            ))
            .await?;
        if !active.is_empty() {
            return Ok(false);
        }
        tx.execute(key_insert(key, false)).await?;
        tx.commit().await?;
        self.announce(None, Change::Key(key.id.clone())).await?;
        Ok(true)
    }

    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.pool
            .fetch_all(query(
                "SELECT * FROM api_keys WHERE revoked_at IS NULL ORDER BY created_at, id",
            ))
            .await?
            .iter()
            .map(key_from_row)
            .collect()
    }

    async fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        let done = self
            .pool
            .execute(
                query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                    .bind(ts(&crate::model::now()))
                    .bind(id),
            )
            .await?;
        self.announce(None, Change::Key(id.to_string())).await?;
        Ok(done > 0)
    }

    async fn touch_keys(&self, used: &[(String, DateTime<Utc>)]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for (id, at) in used {
            tx.execute(
                query("UPDATE api_keys SET last_used_at = ? WHERE id = ?")
                    .bind(ts(at))
                    .bind(id),
            )
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
        let res = self
            .pool
            .execute(
                query("INSERT INTO teams (id, name, created_at) VALUES (?, ?, ?)")
                    .bind(&team.id)
                    .bind(&team.id)
                    .bind(ts(&team.created_at)),
            )
            .await;
        match res {
            Err(e) if is_unique_violation(&e) => Err(StoreError::TeamExists(id.to_string())),
            Err(e) => Err(e.into()),
            Ok(_) => {
                self.announce(None, Change::Team(team.id.clone())).await?;
                Ok(team)
            }
        }
    }

    async fn teams(&self) -> Result<Vec<TeamRecord>, StoreError> {
        let rows = self
            .pool
            .fetch_all(query(
                "SELECT id, created_at FROM teams ORDER BY created_at, id",
            ))
            .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.get("id")?;
                let created: String = row.get("created_at")?;
                Ok(TeamRecord {
                    created_at: parse_time(&id, &created)?,
                    id,
                })
            })
            .collect()
    }

    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for r in records {
            tx.execute(
                query(
                    "INSERT INTO audit (at, team_id, subject, client, action, target, result, \
                     details) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(ts(&r.at))
                .bind(&r.team)
                .bind(&r.subject)
                .bind(&r.client)
                .bind(&r.action)
                .bind(&r.target)
                .bind(&r.result)
                .bind(&r.details),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = self
            .pool
            .fetch_all(
                query(
                    "SELECT * FROM audit WHERE (?1 IS NULL OR team_id = ?1) \
                     AND (?2 IS NULL OR at >= ?2) AND (?3 IS NULL OR action = ?3) \
                     AND (?4 IS NULL OR target = ?4) ORDER BY id LIMIT ?5",
                )
                .bind(&f.team)
                .bind(f.since.as_ref().map(ts))
                .bind(&f.action)
                .bind(&f.target)
                .bind(f.limit as i64),
            )
            .await?;
        rows.iter()
            .map(|row| {
                let id: i64 = row.get("id")?;
                let at: String = row.get("at")?;
                Ok(AuditRecord {
                    id,
                    at: parse_time(&id.to_string(), &at)?,
                    team: row.get("team_id")?,
                    subject: row.get("subject")?,
                    client: row.get("client")?,
                    action: row.get("action")?,
                    target: row.get("target")?,
                    result: row.get("result")?,
                    details: row.get("details")?,
                })
            })
            .collect()
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(self
            .pool
            .execute(query("DELETE FROM audit WHERE at < ?").bind(ts(&before)))
            .await?)
    }

    async fn secret(&self, name: &str, fresh: &str) -> Result<String, StoreError> {
        let key = format!("secret:{name}");
        self.pool
            .execute(
                query("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING")
                    .bind(&key)
                    .bind(fresh),
            )
            .await?;
        let row = self
            .pool
            .fetch_optional(query("SELECT value FROM meta WHERE key = ?").bind(&key))
            .await?
            .ok_or_else(|| corrupt(&key, "missing just after it was written"))?;
        Ok(row.get("value")?)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.pool.execute(query("SELECT 1")).await?;
        Ok(())
    }

    fn shared(&self) -> bool {
        self.engine() == Engine::Postgres
    }

    async fn announce_use(&self, ids: &[String]) -> Result<(), StoreError> {
        // A NOTIFY payload must stay under 8000 bytes: ids go in batches well below that.
        for batch in ids.chunks(200) {
            self.announce(None, Change::Used(batch.to_vec())).await?;
        }
        Ok(())
    }

    async fn follow(&self, shutdown: tokio_util::sync::CancellationToken) -> Option<super::Follow> {
        match self.pg_pool() {
            Some(pool) => Some(super::pg::follow(pool.clone(), shutdown).await),
            None => None,
        }
    }
}

#[cfg(test)]
#[path = "../../tests/it/common/postgres.rs"]
mod testpg;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{new_id, Mode, Status};

    fn sandbox(name: Option<&str>) -> Sandbox {
        Sandbox {
            owner: "alice".into(),
            name: name.map(str::to_string),
            runtime: "python".into(),
            mode: Mode::Persistent,
            dev_server: true,
            command: "true".into(),
            env: [("A".to_string(), "1".to_string())].into(),
            port: Some(3000),
            generation: 0,
            public_ports: vec![8080],
            ..Sandbox::blank(&new_id())
        }
    }

    /// Where a case's store lives: every case runs on both engines.
    enum Db {
        Sqlite(tempfile::TempDir),
        Postgres(String),
    }

    async fn open(db: &Db) -> SqlStore {
        let url = match db {
            Db::Sqlite(dir) => format!("sqlite://{}", dir.path().join("db.sqlite").display()),
            Db::Postgres(url) => url.clone(),
        };
        SqlStore::open(&url).await.unwrap()
    }

    /// Each case as a SQLite test, and all of them in one PostgreSQL test (one throwaway
    /// server, a database per case).
    macro_rules! on_both_engines {
        ($($case:ident),* $(,)?) => {
            mod on_sqlite {
                $(
                    #[tokio::test]
                    async fn $case() {
                        super::$case(super::Db::Sqlite(tempfile::tempdir().unwrap())).await;
                    }
                )*
            }

            #[tokio::test]
            async fn every_case_on_postgres() {
                let Some(server) = super::testpg::PgServer::start() else {
                    return;
                };
                $(
                    $case(Db::Postgres(server.database(stringify!($case)))).await;
                )*
            }
        };
    }

    on_both_engines!(
        ports_are_unique_survive_reopen_and_are_released_on_delete,
        probe_skips_busy_ports_and_names_are_unique_per_owner,
        audit_records_filter_and_expire,
        update_round_trips,
        a_claim_rewrites_ownership_once_and_keeps_names_unique,
        keys_and_teams_round_trip,
        two_stores_never_hand_out_one_port,
        two_stores_starting_at_once_create_one_first_key,
    );

    fn key_record(id: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            team: DEFAULT_TEAM.into(),
            name: "k".into(),
            role: "owner".into(),
            hash: [7; 32],
            created_at: crate::model::now(),
            expires_at: None,
            last_used_at: None,
        }
    }

    /// Gateways starting at once on an empty database each try to create the first owner
    /// key: exactly one does, and a later try (a key exists) creates none.
    async fn two_stores_starting_at_once_create_one_first_key(db: Db) {
        let (a, b) = (open(&db).await, open(&db).await);
        let tries = (0..8).map(|i| {
            let store = if i % 2 == 0 { &a } else { &b };
            async move {
                store
                    .put_first_key(&key_record(&format!("k{i}")))
                    .await
                    .unwrap()
            }
        });
        let created = futures_util::future::join_all(tries).await;
        assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
        assert_eq!(a.keys().await.unwrap().len(), 1);
        assert!(!b.put_first_key(&key_record("late")).await.unwrap());
    }

    /// Two gateways on one database allocate ports at the same time: never the same one.
    async fn two_stores_never_hand_out_one_port(db: Db) {
        let (a, b) = (open(&db).await, open(&db).await);
        let range = 41000..=41019;
        let creates = (0..20).map(|i| {
            let store = if i % 2 == 0 { &a } else { &b };
            let range = range.clone();
            async move {
                let mut sb = sandbox(None);
                store.create(&mut sb, Some(range), &|_| true).await.unwrap();
                sb.allocated_port.unwrap()
            }
        });
        let mut ports = futures_util::future::join_all(creates).await;
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 20, "a port was handed out twice");
        let mut extra = sandbox(None);
        let err = b
            .create(&mut extra, Some(range), &|_| true)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::PortsExhausted(_)), "{err}");
    }

    async fn keys_and_teams_round_trip(db: Db) {
        let store = open(&db).await;
        let key = key_record;
        store.put_key(&key("a"), false).await.unwrap();
        store.put_key(&key("b"), false).await.unwrap();
        assert!(store.put_key(&key("a"), false).await.is_err());
        assert!(store.revoke_key("a").await.unwrap());
        assert!(!store.revoke_key("a").await.unwrap());
        let ids = |keys: Vec<KeyRecord>| keys.into_iter().map(|k| k.id).collect::<Vec<_>>();
        assert_eq!(ids(store.keys().await.unwrap()), ["b"]);
        // `replace` rewrites the key whole and makes it active again.
        let mut again = key("a");
        again.name = "again".into();
        store.put_key(&again, true).await.unwrap();
        let keys = store.keys().await.unwrap();
        assert!(keys
            .iter()
            .any(|k| k.id == "a" && k.name == "again" && k.hash == [7; 32]));
        let used = crate::model::now();
        store.touch_keys(&[("b".into(), used)]).await.unwrap();
        let b = store
            .keys()
            .await
            .unwrap()
            .into_iter()
            .find(|k| k.id == "b");
        assert_eq!(
            b.and_then(|b| b.last_used_at).map(|t| ts(&t)),
            Some(ts(&used))
        );

        store.create_team("t1").await.unwrap();
        let err = store.create_team("t1").await.unwrap_err();
        assert!(matches!(err, StoreError::TeamExists(_)), "{err}");
        let teams: Vec<_> = store
            .teams()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(teams, [DEFAULT_TEAM, "t1"]);
        assert_eq!(store.secret("x", "one").await.unwrap(), "one");
        assert_eq!(store.secret("x", "two").await.unwrap(), "one");
    }

    async fn ports_are_unique_survive_reopen_and_are_released_on_delete(db: Db) {
        let store = open(&db).await;
        let range = Some(40000..=40002);
        let all = |_: u16| true;
        let mut a = sandbox(None);
        let mut b = sandbox(None);
        store.create(&mut a, range.clone(), &all).await.unwrap();
        store.create(&mut b, range.clone(), &all).await.unwrap();
        assert_ne!(a.allocated_port, b.allocated_port);
        drop(store);

        // A restart sees the same allocations and hands out the remaining port only.
        let store = open(&db).await;
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

    async fn probe_skips_busy_ports_and_names_are_unique_per_owner(db: Db) {
        let store = open(&db).await;
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

    async fn audit_records_filter_and_expire(db: Db) {
        let store = open(&db).await;
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

    async fn update_round_trips(db: Db) {
        let store = open(&db).await;
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
    async fn a_claim_rewrites_ownership_once_and_keeps_names_unique(db: Db) {
        let store = open(&db).await;
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
