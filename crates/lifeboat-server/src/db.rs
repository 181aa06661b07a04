//! The control-plane state in an embedded SQLite file (`state.db`):
//! enrollment tokens (hashed), agents and their certificate fingerprints,
//! replicated volumes and their stream positions, recovery points cut.
//!
//! Schema versions go through `PRAGMA user_version`; each step of
//! [`MIGRATIONS`] upgrades one version. Writes are synchronous (WAL,
//! `synchronous=FULL`): a stream position acknowledged to an agent is on
//! disk.

use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use lifeboat_replicate::receiver::StreamState;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

const MIGRATIONS: &[&str] = &["
CREATE TABLE tokens(hash TEXT PRIMARY KEY, site TEXT NOT NULL, created INTEGER NOT NULL,
  expires INTEGER NOT NULL, used_at INTEGER, used_by TEXT);
CREATE TABLE agents(id TEXT PRIMARY KEY, name TEXT NOT NULL, site TEXT NOT NULL,
  fingerprint TEXT NOT NULL UNIQUE, enrolled INTEGER NOT NULL, revoked INTEGER);
CREATE TABLE volumes(item TEXT NOT NULL, volume TEXT NOT NULL, agent TEXT NOT NULL,
  size INTEGER NOT NULL, chunk_size INTEGER NOT NULL, replica TEXT NOT NULL,
  applied_seq INTEGER NOT NULL DEFAULT 0, synced INTEGER NOT NULL DEFAULT 0,
  consistent INTEGER NOT NULL DEFAULT 1, journal_id BLOB NOT NULL DEFAULT x'',
  PRIMARY KEY(item, volume));
CREATE TABLE points(id TEXT PRIMARY KEY, item TEXT NOT NULL, time INTEGER NOT NULL,
  kind TEXT NOT NULL, journal_seq INTEGER, data_bytes INTEGER NOT NULL, added_bytes INTEGER NOT NULL);
", "
ALTER TABLE volumes ADD COLUMN settle INTEGER NOT NULL DEFAULT 0;
"];

pub struct Db {
    c: Mutex<Connection>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentRow {
    pub id: String,
    pub name: String,
    pub site: String,
    pub fingerprint: String,
    pub enrolled: i64,
    pub revoked: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeRow {
    pub item: String,
    pub volume: String,
    pub agent: String,
    pub size: u64,
    pub chunk_size: u32,
    pub replica: String,
    pub applied_seq: u64,
    pub synced: bool,
    pub consistent: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PointRow {
    pub id: String,
    pub item: String,
    pub time: i64,
    pub kind: String,
    pub journal_seq: Option<i64>,
    pub data_bytes: i64,
    pub added_bytes: i64,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Db {
    /// Open (or create) the database and bring its schema up to date.
    ///
    /// # Errors
    /// SQLite errors, or a database from a newer Lifeboat.
    pub fn open(path: &Path) -> Result<Db> {
        let mut c = Connection::open(path)
            .with_context(|| format!("cannot open the state database {}", path.display()))?;
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.pragma_update(None, "synchronous", "FULL")?;
        c.busy_timeout(std::time::Duration::from_secs(10))?;
        let v: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if v as usize > MIGRATIONS.len() {
            bail!(
                "{}: schema version {v} is newer than this Lifeboat understands ({}); upgrade Lifeboat",
                path.display(),
                MIGRATIONS.len()
            );
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(v as usize) {
            let t = c.transaction()?;
            t.execute_batch(m)?;
            t.pragma_update(None, "user_version", (i + 1) as i64)?;
            t.commit()?;
        }
        Ok(Db { c: Mutex::new(c) })
    }

    pub fn add_token(&self, hash: &str, site: &str, ttl_secs: i64) -> Result<i64> {
        let expires = now() + ttl_secs;
        self.c.lock().unwrap().execute(
            "INSERT INTO tokens(hash, site, created, expires) VALUES (?1, ?2, ?3, ?4)",
            params![hash, site, now(), expires],
        )?;
        Ok(expires)
    }

    /// Use a token once: returns its site, or why it cannot be used.
    pub fn use_token(
        &self,
        hash: &str,
        agent: &str,
    ) -> Result<std::result::Result<String, String>> {
        let mut c = self.c.lock().unwrap();
        let t = c.transaction()?;
        let row: Option<(String, i64, Option<i64>)> = t
            .query_row(
                "SELECT site, expires, used_at FROM tokens WHERE hash = ?1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let res = match row {
            None => Err("unknown enrollment token".to_string()),
            Some((_, _, Some(_))) => Err("this enrollment token was already used; create a new one with `lifeboat server token create`".to_string()),
            Some((_, exp, None)) if exp < now() => Err("this enrollment token has expired; create a new one".to_string()),
            Some((site, _, None)) => {
                t.execute(
                    "UPDATE tokens SET used_at = ?2, used_by = ?3 WHERE hash = ?1",
                    params![hash, now(), agent],
                )?;
                Ok(site)
            }
        };
        t.commit()?;
        Ok(res)
    }

    pub fn add_agent(&self, id: &str, name: &str, site: &str, fingerprint: &str) -> Result<()> {
        self.c.lock().unwrap().execute(
            "INSERT INTO agents(id, name, site, fingerprint, enrolled) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, name, site, fingerprint, now()],
        )?;
        Ok(())
    }

    fn agent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRow> {
        Ok(AgentRow {
            id: r.get(0)?,
            name: r.get(1)?,
            site: r.get(2)?,
            fingerprint: r.get(3)?,
            enrolled: r.get(4)?,
            revoked: r.get(5)?,
        })
    }

    pub fn agent_by_fingerprint(&self, fp: &str) -> Result<Option<AgentRow>> {
        Ok(self
            .c
            .lock()
            .unwrap()
            .query_row(
                "SELECT id, name, site, fingerprint, enrolled, revoked FROM agents WHERE fingerprint = ?1",
                [fp],
                Self::agent_row,
            )
            .optional()?)
    }

    pub fn agents(&self) -> Result<Vec<AgentRow>> {
        let c = self.c.lock().unwrap();
        let mut s = c.prepare(
            "SELECT id, name, site, fingerprint, enrolled, revoked FROM agents ORDER BY enrolled",
        )?;
        let v = s
            .query_map([], Self::agent_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v)
    }

    /// Revoke an agent by id or name. Returns how many were revoked.
    pub fn revoke(&self, who: &str) -> Result<usize> {
        Ok(self.c.lock().unwrap().execute(
            "UPDATE agents SET revoked = ?2 WHERE (id = ?1 OR name = ?1) AND revoked IS NULL",
            params![who, now()],
        )?)
    }

    pub fn is_revoked(&self, agent_id: &str) -> Result<bool> {
        let r: Option<Option<i64>> = self
            .c
            .lock()
            .unwrap()
            .query_row(
                "SELECT revoked FROM agents WHERE id = ?1",
                [agent_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(!matches!(r, Some(None)))
    }

    /// The agent a volume belongs to, if it is known.
    pub fn volume_owner(&self, item: &str, volume: &str) -> Result<Option<String>> {
        Ok(self
            .c
            .lock()
            .unwrap()
            .query_row(
                "SELECT agent FROM volumes WHERE item = ?1 AND volume = ?2",
                [item, volume],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The volume's row, created if new.
    pub fn volume(
        &self,
        item: &str,
        volume: &str,
        agent: &str,
        size: u64,
        chunk_size: u32,
        replica: &str,
    ) -> Result<VolumeRow> {
        let c = self.c.lock().unwrap();
        c.execute(
            "INSERT INTO volumes(item, volume, agent, size, chunk_size, replica) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(item, volume) DO UPDATE SET agent = ?3, size = ?4, chunk_size = ?5",
            params![item, volume, agent, size as i64, chunk_size, replica],
        )?;
        let v = c.query_row(
            "SELECT item, volume, agent, size, chunk_size, replica, applied_seq, synced, consistent FROM volumes WHERE item = ?1 AND volume = ?2",
            [item, volume],
            Self::volume_row,
        )?;
        Ok(v)
    }

    fn volume_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeRow> {
        Ok(VolumeRow {
            item: r.get(0)?,
            volume: r.get(1)?,
            agent: r.get(2)?,
            size: r.get::<_, i64>(3)? as u64,
            chunk_size: r.get(4)?,
            replica: r.get(5)?,
            applied_seq: r.get::<_, i64>(6)? as u64,
            synced: r.get(7)?,
            consistent: r.get(8)?,
        })
    }

    pub fn volumes(&self) -> Result<Vec<VolumeRow>> {
        let c = self.c.lock().unwrap();
        let mut s = c.prepare(
            "SELECT item, volume, agent, size, chunk_size, replica, applied_seq, synced, consistent FROM volumes ORDER BY item, volume",
        )?;
        let v = s
            .query_map([], Self::volume_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v)
    }

    pub fn stream_state(&self, item: &str, volume: &str) -> Result<StreamState> {
        let c = self.c.lock().unwrap();
        let (applied, synced, consistent, jid, settle): (i64, bool, bool, Vec<u8>, i64) = c.query_row(
            "SELECT applied_seq, synced, consistent, journal_id, settle FROM volumes WHERE item = ?1 AND volume = ?2",
            [item, volume],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )?;
        Ok(StreamState {
            applied_seq: applied as u64,
            synced,
            consistent,
            journal_id: jid.try_into().unwrap_or([0; 16]),
            settle: settle as u64,
        })
    }

    pub fn save_stream_state(&self, item: &str, volume: &str, st: &StreamState) -> Result<()> {
        self.c.lock().unwrap().execute(
            "UPDATE volumes SET applied_seq = ?3, synced = ?4, consistent = ?5, journal_id = ?6, settle = ?7 WHERE item = ?1 AND volume = ?2",
            params![item, volume, st.applied_seq as i64, st.synced, st.consistent, st.journal_id.to_vec(), st.settle as i64],
        )?;
        Ok(())
    }

    pub fn add_point(&self, p: &PointRow) -> Result<()> {
        self.c.lock().unwrap().execute(
            "INSERT INTO points(id, item, time, kind, journal_seq, data_bytes, added_bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![p.id, p.item, p.time, p.kind, p.journal_seq, p.data_bytes, p.added_bytes],
        )?;
        Ok(())
    }

    pub fn forget_points(&self, ids: &[String]) -> Result<()> {
        let mut c = self.c.lock().unwrap();
        let t = c.transaction()?;
        for id in ids {
            t.execute("DELETE FROM points WHERE id = ?1", [id])?;
        }
        t.commit()?;
        Ok(())
    }

    pub fn points(&self, item: Option<&str>) -> Result<Vec<PointRow>> {
        let c = self.c.lock().unwrap();
        let mut s = c.prepare(
            "SELECT id, item, time, kind, journal_seq, data_bytes, added_bytes FROM points WHERE ?1 IS NULL OR item = ?1 ORDER BY time, id",
        )?;
        let v = s
            .query_map([item], |r| {
                Ok(PointRow {
                    id: r.get(0)?,
                    item: r.get(1)?,
                    time: r.get(2)?,
                    kind: r.get(3)?,
                    journal_seq: r.get(4)?,
                    data_bytes: r.get(5)?,
                    added_bytes: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_and_positions_persist() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("state.db")).unwrap();
        db.add_token("h", "primary", 60).unwrap();
        assert_eq!(db.use_token("h", "a1").unwrap(), Ok("primary".into()));
        assert!(db
            .use_token("h", "a2")
            .unwrap()
            .unwrap_err()
            .contains("already used"));
        assert!(db.use_token("nope", "a2").unwrap().is_err());
        db.add_token("old", "primary", -1).unwrap();
        assert!(db
            .use_token("old", "a3")
            .unwrap()
            .unwrap_err()
            .contains("expired"));
        db.add_agent("id1", "web01", "primary", "fp").unwrap();
        assert!(!db.is_revoked("id1").unwrap());
        assert_eq!(db.revoke("web01").unwrap(), 1);
        assert!(db.is_revoked("id1").unwrap());
        assert!(db.is_revoked("unknown").unwrap());
        db.volume("db", "disk0", "id1", 100, 65536, "/r").unwrap();
        let st = StreamState {
            applied_seq: 7,
            synced: true,
            consistent: true,
            journal_id: [3; 16],
            settle: 4,
        };
        db.save_stream_state("db", "disk0", &st).unwrap();
        drop(db);
        let db = Db::open(&d.path().join("state.db")).unwrap();
        assert_eq!(db.stream_state("db", "disk0").unwrap(), st);
    }
}
