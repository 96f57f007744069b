//! The coordinator's durable state in one SQLite file: the federation, the certificate
//! allow-list, the merchant registry, every adapter version, every round's record, the
//! privacy ledger, the merchants' evaluation reports and the quarantine. Schema migrations are versioned
//! with `PRAGMA user_version` and applied in one transaction at open.
//!
//! Crash safety comes from SQLite (WAL, `synchronous=FULL`) and from one rule: a round's
//! adapter, its round record and its ledger entry are written in one transaction
//! ([`Store::commit_round`]), so after a crash either all three exist or none does.

use std::path::Path;
use std::sync::Mutex;

use guild_privacy::ledger::{Charge, LedgerEntry};
use guild_privacy::secagg::Phase;
use rusqlite::{Connection, OptionalExtension, params};

/// Each entry migrates the schema from version `i` to `i + 1`.
/// What the `phase` column holds once every phase of an open round closed.
const COMMITTING: &str = "committing";

const MIGRATIONS: &[&str] = &[
    // 1: federation identity and merchant registry.
    "CREATE TABLE federation (
         id BLOB NOT NULL CHECK (length(id) = 16),
         base_model_sha256 BLOB NOT NULL CHECK (length(base_model_sha256) = 32),
         created_at INTEGER NOT NULL
     );
     CREATE TABLE merchants (
         merchant_id TEXT PRIMARY KEY,
         display_name TEXT NOT NULL,
         signing_public_key BLOB NOT NULL CHECK (length(signing_public_key) = 32),
         registered_at INTEGER NOT NULL
     );",
    // 2: allow-list, adapters, rounds, ledger, evaluation reports.
    "CREATE TABLE allow_list (
         merchant_id TEXT PRIMARY KEY,
         cert_sha256 BLOB NOT NULL UNIQUE CHECK (length(cert_sha256) = 32),
         revoked INTEGER NOT NULL DEFAULT 0,
         added_at INTEGER NOT NULL
     );
     CREATE TABLE rounds (
         round_id INTEGER PRIMARY KEY,
         status TEXT NOT NULL CHECK (status IN ('open', 'completed', 'aborted')),
         opened_at INTEGER NOT NULL,
         closed_at INTEGER,
         cohort INTEGER NOT NULL,
         phase TEXT NOT NULL DEFAULT 'AdvertiseKeys',
         survivors INTEGER,
         adapter_version INTEGER,
         reason TEXT
     );
     CREATE TABLE adapters (
         version INTEGER PRIMARY KEY,
         sha256 BLOB NOT NULL CHECK (length(sha256) = 32),
         data BLOB NOT NULL,
         optimizer_state BLOB,
         round_id INTEGER REFERENCES rounds (round_id),
         created_at INTEGER NOT NULL
     );
     CREATE TABLE ledger (
         round_id INTEGER PRIMARY KEY REFERENCES rounds (round_id),
         event TEXT NOT NULL
     );
     CREATE TABLE evaluations (
         merchant_id TEXT NOT NULL,
         adapter_version INTEGER NOT NULL,
         users INTEGER NOT NULL,
         hits_at_10 INTEGER NOT NULL,
         ndcg_at_10_sum REAL NOT NULL,
         reciprocal_rank_sum REAL NOT NULL,
         PRIMARY KEY (merchant_id, adapter_version)
     );",
    // 3: merchants named as misbehaving in a round, kept out of cohorts until lifted.
    "CREATE TABLE quarantine (
         merchant_id TEXT PRIMARY KEY,
         round_id INTEGER NOT NULL,
         reason TEXT NOT NULL,
         since INTEGER NOT NULL
     );",
    // 4: the client certificate a merchant registered with (it binds the signing key; every
    // task lists it so that clients can check the key). Empty for rows registered before.
    "ALTER TABLE merchants ADD COLUMN certificate BLOB NOT NULL DEFAULT x'';",
];

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("store was written by a newer coordinator (schema version {found}, this build knows {known})")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("store query failed: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(
        "store holds a federation built on base model {stored}, but this coordinator was started with {configured}"
    )]
    BaseModelMismatch { stored: String, configured: String },
    #[error("store holds a malformed {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("adapter version {0} does not exist")]
    NoSuchAdapter(u64),
}

/// An adapter version as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterRecord {
    pub version: u64,
    pub sha256: [u8; 32],
    /// The flat B vector, little-endian f32 (see `guild_proto::adapter`).
    pub data: Vec<u8>,
    /// Server-optimiser state (FedAdam's moments), little-endian f32.
    pub optimizer_state: Option<Vec<u8>>,
}

/// What one completed round writes, all in one transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundCommit {
    pub round_id: u64,
    pub survivors: u32,
    pub adapter: AdapterRecord,
    /// The round's privacy charge (event and unit); none in `dangerous_none` mode or when
    /// [`Store::charge_round`] charged it already.
    pub ledger_event: Option<Charge>,
}

/// Merchants' evaluation counts of one adapter version, summed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvaluationSums {
    pub adapter_version: u64,
    pub users: u64,
    pub hits_at_10: u64,
    pub ndcg_at_10_sum: f64,
    pub reciprocal_rank_sum: f64,
}

/// Counts of rounds by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundCounts {
    pub completed: u64,
    pub aborted: u64,
    pub open: u64,
}

/// An aborted round: the phase it was in and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbortedRound {
    pub round_id: u64,
    pub phase: String,
    pub reason: String,
}

/// A merchant kept out of cohorts after it was named as misbehaving.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Quarantined {
    pub merchant_id: String,
    /// The round in which it was named.
    pub round_id: u64,
    pub reason: String,
    /// Unix seconds.
    pub since: i64,
}

/// A merchant as the registry records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerchantRecord {
    pub merchant_id: String,
    pub display_name: String,
    pub signing_public_key: [u8; 32],
    /// The client certificate (DER) it registered with, which binds `signing_public_key`.
    pub certificate: Vec<u8>,
}

#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if absent) the store at `path` and migrates it to the latest schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        Self::init(conn)
    }

    /// An in-memory store, for tests.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(StoreError::SchemaTooNew { found, known });
        }
        let tx = conn.transaction()?;
        for migration in &MIGRATIONS[found as usize..] {
            tx.execute_batch(migration)?;
        }
        tx.pragma_update(None, "user_version", known)?;
        tx.commit()?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (every write is a
        // transaction), so a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The federation's id, created on first use for the given base model.
    pub fn federation(
        &self,
        base_model_sha256: [u8; 32],
        fresh_id: [u8; 16],
    ) -> Result<[u8; 16], StoreError> {
        let conn = self.conn();
        let existing: Option<(Vec<u8>, Vec<u8>)> = conn
            .query_row("SELECT id, base_model_sha256 FROM federation", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match existing {
            Some((id, base)) => {
                if base != base_model_sha256 {
                    return Err(StoreError::BaseModelMismatch {
                        stored: hex::encode(base),
                        configured: hex::encode(base_model_sha256),
                    });
                }
                let mut out = [0u8; 16];
                out.copy_from_slice(&id);
                Ok(out)
            }
            None => {
                conn.execute(
                    "INSERT INTO federation (id, base_model_sha256, created_at) VALUES (?1, ?2, unixepoch())",
                    params![fresh_id.as_slice(), base_model_sha256.as_slice()],
                )?;
                Ok(fresh_id)
            }
        }
    }

    /// Records a merchant, or updates its name and key if it registers again.
    pub fn upsert_merchant(&self, record: &MerchantRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO merchants (merchant_id, display_name, signing_public_key, certificate, registered_at)
             VALUES (?1, ?2, ?3, ?4, unixepoch())
             ON CONFLICT (merchant_id) DO UPDATE SET
                 display_name = excluded.display_name,
                 signing_public_key = excluded.signing_public_key,
                 certificate = excluded.certificate",
            params![
                record.merchant_id,
                record.display_name,
                record.signing_public_key.as_slice(),
                record.certificate.as_slice()
            ],
        )?;
        Ok(())
    }

    /// Whether `merchant_id` is registered (one indexed lookup).
    pub fn is_registered(&self, merchant_id: &str) -> Result<bool, StoreError> {
        let found = self
            .conn()
            .query_row("SELECT 1 FROM merchants WHERE merchant_id = ?1", params![merchant_id], |_| Ok(()))
            .optional()?;
        Ok(found.is_some())
    }

    /// How many merchants are registered.
    pub fn merchant_count(&self) -> Result<u64, StoreError> {
        let count: i64 = self.conn().query_row("SELECT count(*) FROM merchants", [], |r| r.get(0))?;
        Ok(count as u64)
    }

    pub fn merchants(&self) -> Result<Vec<MerchantRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT merchant_id, display_name, signing_public_key, certificate FROM merchants ORDER BY merchant_id",
        )?;
        let rows = stmt.query_map([], |r| {
            let key: Vec<u8> = r.get(2)?;
            let mut signing_public_key = [0u8; 32];
            signing_public_key.copy_from_slice(&key);
            Ok(MerchantRecord {
                merchant_id: r.get(0)?,
                display_name: r.get(1)?,
                signing_public_key,
                certificate: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn hash32(bytes: Vec<u8>, what: &'static str) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| StoreError::Corrupt { what, reason: format!("{} bytes, not 32", b.len()) })
}

/// One merchant on the allow-list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub merchant_id: String,
    pub cert_sha256: [u8; 32],
    pub revoked: bool,
    /// When it was added (Unix seconds).
    pub added_at: i64,
}

impl Store {
    /// Adds `merchant_id` to the allow-list under the certificate with sha256
    /// `cert_sha256`, or replaces its certificate (and un-revokes it).
    pub fn allow(&self, merchant_id: &str, cert_sha256: [u8; 32]) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO allow_list (merchant_id, cert_sha256, revoked, added_at) VALUES (?1, ?2, 0, unixepoch())
             ON CONFLICT (merchant_id) DO UPDATE SET cert_sha256 = excluded.cert_sha256, revoked = 0",
            params![merchant_id, cert_sha256.as_slice()],
        )?;
        Ok(())
    }

    /// Revokes a merchant's certificate; returns whether it was on the list.
    pub fn revoke(&self, merchant_id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("UPDATE allow_list SET revoked = 1 WHERE merchant_id = ?1", params![merchant_id])?;
        Ok(n > 0)
    }

    /// The merchant a certificate belongs to: `Ok(None)` for an unknown certificate,
    /// `Err`-free `Some((id, revoked))` otherwise.
    pub fn certificate_owner(&self, cert_sha256: &[u8; 32]) -> Result<Option<(String, bool)>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT merchant_id, revoked FROM allow_list WHERE cert_sha256 = ?1",
                params![cert_sha256.as_slice()],
                |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)),
            )
            .optional()?)
    }

    /// Registered merchants whose certificate is allowed and not revoked, with their
    /// signing keys: the population rounds sample from.
    pub fn eligible_merchants(&self) -> Result<Vec<MerchantRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT m.merchant_id, m.display_name, m.signing_public_key, m.certificate FROM merchants m
             JOIN allow_list a ON a.merchant_id = m.merchant_id
             WHERE a.revoked = 0 AND m.merchant_id NOT IN (SELECT merchant_id FROM quarantine)
             ORDER BY m.merchant_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (merchant_id, display_name, key, certificate) = row?;
            out.push(MerchantRecord {
                merchant_id,
                display_name,
                signing_public_key: hash32(key, "signing key")?,
                certificate,
            });
        }
        Ok(out)
    }

    /// Quarantines `merchant_id` (named as misbehaving in `round_id`); a merchant already
    /// quarantined keeps its first reason. Returns whether it was newly quarantined.
    pub fn quarantine(&self, merchant_id: &str, round_id: u64, reason: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "INSERT INTO quarantine (merchant_id, round_id, reason, since) VALUES (?1, ?2, ?3, unixepoch())
             ON CONFLICT (merchant_id) DO NOTHING",
            params![merchant_id, round_id as i64, reason],
        )?;
        Ok(n > 0)
    }

    /// Lifts a merchant's quarantine; returns whether it was quarantined.
    pub fn lift_quarantine(&self, merchant_id: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute("DELETE FROM quarantine WHERE merchant_id = ?1", params![merchant_id])?;
        Ok(n > 0)
    }

    /// Every quarantined merchant, oldest first.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT merchant_id, round_id, reason, since FROM quarantine ORDER BY since, merchant_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Quarantined {
                merchant_id: r.get(0)?,
                round_id: r.get::<_, i64>(1)? as u64,
                reason: r.get(2)?,
                since: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The allow-list, by merchant id.
    pub fn allow_list(&self) -> Result<Vec<Allowed>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT merchant_id, cert_sha256, revoked, added_at FROM allow_list ORDER BY merchant_id",
        )?;
        let rows = statement
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, i64>(2)? != 0, r.get(3)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(merchant_id, sha, revoked, added_at)| {
                Ok(Allowed { merchant_id, cert_sha256: hash32(sha, "certificate hash")?, revoked, added_at })
            })
            .collect()
    }

    /// The adapter versions stored, oldest first.
    pub fn adapter_versions(&self) -> Result<Vec<u64>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare("SELECT version FROM adapters ORDER BY version")?;
        let versions = statement.query_map([], |r| r.get::<_, i64>(0))?.collect::<Result<Vec<_>, _>>()?;
        Ok(versions.into_iter().map(|v| v as u64).collect())
    }

    /// How many certificates are allowed and not revoked.
    pub fn allowed_count(&self) -> Result<u64, StoreError> {
        let n: i64 =
            self.conn().query_row("SELECT count(*) FROM allow_list WHERE revoked = 0", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// Stores adapter version 0 (all zeros) if the store has no adapter yet.
    pub fn ensure_initial_adapter(&self, data: &[u8], sha256: [u8; 32]) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO adapters (version, sha256, data, optimizer_state, round_id, created_at)
             SELECT 0, ?1, ?2, NULL, NULL, unixepoch() WHERE NOT EXISTS (SELECT 1 FROM adapters)",
            params![sha256.as_slice(), data],
        )?;
        Ok(())
    }

    fn adapter_where(
        &self,
        clause: &str,
        args: impl rusqlite::Params,
    ) -> Result<Option<AdapterRecord>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                &format!("SELECT version, sha256, data, optimizer_state FROM adapters {clause}"),
                args,
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        row.map(|(version, sha, data, optimizer_state)| {
            Ok(AdapterRecord {
                version: version as u64,
                sha256: hash32(sha, "adapter hash")?,
                data,
                optimizer_state,
            })
        })
        .transpose()
    }

    pub fn latest_adapter(&self) -> Result<Option<AdapterRecord>, StoreError> {
        self.adapter_where("ORDER BY version DESC LIMIT 1", [])
    }

    pub fn adapter(&self, version: u64) -> Result<AdapterRecord, StoreError> {
        self.adapter_where("WHERE version = ?1", params![version as i64])?
            .ok_or(StoreError::NoSuchAdapter(version))
    }

    /// The round that committed adapter `version` (none for version 0).
    pub fn round_of_adapter(&self, version: u64) -> Result<Option<u64>, StoreError> {
        let round: Option<Option<i64>> = self
            .conn()
            .query_row("SELECT round_id FROM adapters WHERE version = ?1", params![version as i64], |r| {
                r.get(0)
            })
            .optional()?;
        round.ok_or(StoreError::NoSuchAdapter(version)).map(|r| r.map(|id| id as u64))
    }

    pub fn adapter_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn().query_row("SELECT count(*) FROM adapters", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// Marks every round left open by a previous run aborted; returns how many.
    pub fn abort_open_rounds(&self, reason: &str) -> Result<u64, StoreError> {
        let n = self.conn().execute(
            "UPDATE rounds SET status = 'aborted', closed_at = unixepoch(), reason = ?1 WHERE status = 'open'",
            params![reason],
        )?;
        Ok(n as u64)
    }

    /// Records a new open round and returns its id, one past every id ever used (ids are
    /// never reused, so a message bound to an old round can never match a new one).
    pub fn open_round(&self, cohort: u32) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let next: i64 =
            tx.query_row("SELECT coalesce(max(round_id), 0) + 1 FROM rounds", [], |r| r.get(0))?;
        tx.execute(
            "INSERT INTO rounds (round_id, status, opened_at, cohort) VALUES (?1, 'open', unixepoch(), ?2)",
            params![next, cohort],
        )?;
        tx.commit()?;
        Ok(next as u64)
    }

    /// Records the phase an open round reached (for `guild-coordinator status`); `None`
    /// once every phase closed and the round is being committed.
    pub fn set_round_phase(&self, round_id: u64, phase: Option<Phase>) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE rounds SET phase = ?2 WHERE round_id = ?1 AND status = 'open'",
            params![round_id as i64, phase.map_or(COMMITTING, Phase::name)],
        )?;
        Ok(())
    }

    /// The open round and its phase (`None`: committing), if any.
    pub fn open_round_phase(&self) -> Result<Option<(u64, Option<Phase>)>, StoreError> {
        let row: Option<(u64, String)> = self
            .conn()
            .query_row(
                "SELECT round_id, phase FROM rounds WHERE status = 'open' ORDER BY round_id DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?;
        row.map(|(round, phase)| {
            let phase = if phase == COMMITTING {
                None
            } else {
                Some(phase.parse::<Phase>().map_err(|e| StoreError::Corrupt {
                    what: "round phase",
                    reason: format!("round {round}: {e}"),
                })?)
            };
            Ok((round, phase))
        })
        .transpose()
    }

    pub fn abort_round(&self, round_id: u64, reason: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE rounds SET status = 'aborted', closed_at = unixepoch(), reason = ?2 WHERE round_id = ?1 AND status = 'open'",
            params![round_id as i64, reason],
        )?;
        Ok(())
    }

    /// Charges an open round's privacy event to the ledger, durably, before anything of the
    /// round can be released (the coordinator calls it before the first Unmask share is
    /// asked for). A charge is never refunded: an aborted or crashed round keeps it.
    pub fn charge_round(&self, round_id: u64, charge: &Charge) -> Result<(), StoreError> {
        let json = serde_json::to_string(charge).map_err(|e| StoreError::Corrupt {
            what: "ledger event",
            reason: format!("round {round_id}: {e}"),
        })?;
        let conn = self.conn();
        let open: i64 = conn.query_row(
            "SELECT count(*) FROM rounds WHERE round_id = ?1 AND status = 'open'",
            params![round_id as i64],
            |r| r.get(0),
        )?;
        if open != 1 {
            return Err(StoreError::Corrupt {
                what: "round",
                reason: format!("round {round_id} is not open"),
            });
        }
        conn.execute("INSERT INTO ledger (round_id, event) VALUES (?1, ?2)", params![round_id as i64, json])?;
        Ok(())
    }

    /// Commits a completed round: the new adapter, the round record and the ledger entry
    /// (`None` when [`Self::charge_round`] charged it already), in one transaction.
    pub fn commit_round(&self, commit: &RoundCommit) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let updated = tx.execute(
            "UPDATE rounds SET status = 'completed', closed_at = unixepoch(), survivors = ?2, adapter_version = ?3
             WHERE round_id = ?1 AND status = 'open'",
            params![commit.round_id as i64, commit.survivors, commit.adapter.version as i64],
        )?;
        if updated != 1 {
            return Err(StoreError::Corrupt {
                what: "round",
                reason: format!("round {} is not open", commit.round_id),
            });
        }
        tx.execute(
            "INSERT INTO adapters (version, sha256, data, optimizer_state, round_id, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, unixepoch())",
            params![
                commit.adapter.version as i64,
                commit.adapter.sha256.as_slice(),
                commit.adapter.data,
                commit.adapter.optimizer_state,
                commit.round_id as i64
            ],
        )?;
        if let Some(event) = &commit.ledger_event {
            let json = serde_json::to_string(event).map_err(|e| StoreError::Corrupt {
                what: "ledger event",
                reason: format!("round {}: {e}", commit.round_id),
            })?;
            tx.execute(
                "INSERT INTO ledger (round_id, event) VALUES (?1, ?2)",
                params![commit.round_id as i64, json],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every ledger entry, in round order.
    pub fn ledger(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT round_id, event FROM ledger ORDER BY round_id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (round_id, json) = row?;
            // Rows written before the shopper unit existed hold a bare event: merchant unit.
            let Charge { unit, event } = serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
                what: "ledger entry",
                reason: format!("round {round_id}: {e}"),
            })?;
            Ok(LedgerEntry { round_id, event, unit })
        })
        .collect()
    }

    pub fn round_counts(&self) -> Result<RoundCounts, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT status, count(*) FROM rounds GROUP BY status")?;
        let mut counts = RoundCounts::default();
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        for row in rows {
            match row? {
                (s, n) if s == "completed" => counts.completed = n,
                (s, n) if s == "aborted" => counts.aborted = n,
                (_, n) => counts.open = n,
            }
        }
        Ok(counts)
    }

    /// The last `n` aborted rounds, newest first: why each was aborted and in which phase.
    pub fn recent_aborts(&self, n: u64) -> Result<Vec<AbortedRound>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT round_id, phase, coalesce(reason, '') FROM rounds WHERE status = 'aborted'
             ORDER BY round_id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![n as i64], |r| {
            Ok(AbortedRound { round_id: r.get::<_, i64>(0)? as u64, phase: r.get(1)?, reason: r.get(2)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a merchant's evaluation of an adapter version (the latest report wins).
    pub fn record_evaluation(&self, report: &guild_proto::domain::MetricsReport) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO evaluations VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                report.merchant_id.as_str(),
                report.adapter_version as i64,
                report.users as i64,
                report.hits_at_10 as i64,
                report.ndcg_at_10_sum,
                report.reciprocal_rank_sum
            ],
        )?;
        Ok(())
    }

    /// Summed evaluation counts per adapter version.
    pub fn evaluations(&self) -> Result<Vec<EvaluationSums>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT adapter_version, sum(users), sum(hits_at_10), sum(ndcg_at_10_sum), sum(reciprocal_rank_sum)
             FROM evaluations GROUP BY adapter_version ORDER BY adapter_version",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(EvaluationSums {
                adapter_version: r.get::<_, i64>(0)? as u64,
                users: r.get::<_, i64>(1)? as u64,
                hits_at_10: r.get::<_, i64>(2)? as u64,
                ndcg_at_10_sum: r.get(3)?,
                reciprocal_rank_sum: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use guild_privacy::PrivacyUnit;
    use guild_privacy::ledger::PrivacyEvent;

    use super::*;

    /// Registered merchants outlive the daemon; opening the store again runs its migrations
    /// again without harm; the federation's id is fixed at the first open, and a store made
    /// for another base model refuses to open for this one.
    #[test]
    fn registry_survives_reopening_and_migrations_are_idempotent() {
        let (_dir, path) = guild_testkit::scratch_path("guild.db");
        let record = MerchantRecord {
            merchant_id: "shop-1".into(),
            display_name: "Shop One".into(),
            signing_public_key: [7; 32],
            certificate: vec![1, 2, 3],
        };
        {
            let store = Store::open(&path).expect("open");
            assert_eq!(store.federation([1; 32], [2; 16]).expect("federation"), [2; 16]);
            store.upsert_merchant(&record).expect("insert");
        }
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.merchants().expect("list"), vec![record]);
        assert_eq!(store.merchant_count().expect("count"), 1);
        assert!(store.is_registered("shop-1").expect("lookup"));
        assert!(!store.is_registered("shop-2").expect("lookup"));
        assert_eq!(store.federation([1; 32], [9; 16]).expect("federation"), [2; 16], "id is stable");
        assert!(matches!(store.federation([3; 32], [9; 16]), Err(StoreError::BaseModelMismatch { .. })));
    }

    #[test]
    fn a_quarantined_merchant_leaves_the_eligible_population_until_lifted() {
        let store = Store::open_in_memory().expect("open");
        for (i, id) in ["shop-1", "shop-2"].into_iter().enumerate() {
            let record = MerchantRecord {
                merchant_id: id.into(),
                display_name: id.into(),
                signing_public_key: [i as u8; 32],
                certificate: Vec::new(),
            };
            store.upsert_merchant(&record).expect("register");
            store.allow(id, [i as u8 + 1; 32]).expect("allow");
        }
        let eligible = |s: &Store| -> Vec<String> {
            s.eligible_merchants().expect("eligible").into_iter().map(|m| m.merchant_id).collect()
        };
        assert_eq!(eligible(&store), ["shop-1", "shop-2"]);
        assert!(store.quarantine("shop-2", 7, "sealed garbage shares").expect("quarantine"));
        assert!(!store.quarantine("shop-2", 8, "again").expect("idempotent"), "the first reason stays");
        assert_eq!(eligible(&store), ["shop-1"]);
        let listed = store.quarantined().expect("list");
        assert_eq!((listed[0].merchant_id.as_str(), listed[0].round_id), ("shop-2", 7));
        assert_eq!(listed[0].reason, "sealed garbage shares");
        assert!(store.lift_quarantine("shop-2").expect("lift"));
        assert!(!store.lift_quarantine("shop-2").expect("lift twice"));
        assert_eq!(eligible(&store), ["shop-1", "shop-2"]);
    }

    fn commit(round_id: u64, version: u64) -> RoundCommit {
        RoundCommit {
            round_id,
            survivors: 3,
            adapter: AdapterRecord {
                version,
                sha256: [version as u8; 32],
                data: vec![1, 2, 3, 4],
                optimizer_state: None,
            },
            ledger_event: Some(Charge {
                unit: PrivacyUnit::Merchant,
                event: PrivacyEvent::SubsampledZcdp { sampling_rate: 0.1, rho: round_id as f64 },
            }),
        }
    }

    #[test]
    fn a_round_commits_adapter_record_and_ledger_together_or_not_at_all() {
        let store = Store::open_in_memory().expect("open");
        store.ensure_initial_adapter(&[0; 4], [0; 32]).expect("v0");
        store.ensure_initial_adapter(&[9; 4], [9; 32]).expect("idempotent");
        assert_eq!(store.adapter(0).expect("v0").data, vec![0; 4]);
        let r1 = store.open_round(3).expect("open");
        store.commit_round(&commit(r1, 1)).expect("commit");
        // A second commit of the same round, or of an existing version, changes nothing.
        assert!(store.commit_round(&commit(r1, 2)).is_err());
        let r2 = store.open_round(3).expect("open");
        assert!(store.commit_round(&commit(r2, 1)).is_err(), "version 1 exists");
        assert_eq!(
            store.ledger().expect("ledger"),
            vec![LedgerEntry {
                round_id: r1,
                event: PrivacyEvent::SubsampledZcdp { sampling_rate: 0.1, rho: r1 as f64 },
                unit: PrivacyUnit::Merchant,
            }]
        );
        assert_eq!(store.open_round_phase().expect("phase"), Some((r2, Some(Phase::AdvertiseKeys))));
        store.set_round_phase(r2, Some(Phase::MaskedInput)).expect("set");
        assert_eq!(store.open_round_phase().expect("phase"), Some((r2, Some(Phase::MaskedInput))));
        store.set_round_phase(r2, None).expect("set");
        assert_eq!(store.open_round_phase().expect("phase"), Some((r2, None)));
        assert_eq!(store.round_counts().expect("counts"), RoundCounts { completed: 1, aborted: 0, open: 1 });
        assert_eq!(store.abort_open_rounds("restart").expect("abort"), 1);
        let r3 = store.open_round(3).expect("open");
        assert!(r3 > r2, "round ids are never reused");
        store.abort_round(r3, "AdvertiseKeys deadline: 2 of 3").expect("abort");
        let aborted = |round_id, phase: &str, reason: &str| AbortedRound {
            round_id,
            phase: phase.into(),
            reason: reason.into(),
        };
        assert_eq!(
            store.recent_aborts(5).expect("aborts"),
            vec![
                aborted(r3, "AdvertiseKeys", "AdvertiseKeys deadline: 2 of 3"),
                aborted(r2, COMMITTING, "restart")
            ]
        );
        assert_eq!(store.recent_aborts(1).expect("aborts").len(), 1);
        assert_eq!(store.latest_adapter().expect("latest").map(|a| a.version), Some(1));
    }

    #[test]
    fn allow_list_knows_certificates_and_revocations() {
        let store = Store::open_in_memory().expect("open");
        store.allow("merchant-001", [1; 32]).expect("allow");
        assert_eq!(store.certificate_owner(&[1; 32]).expect("lookup"), Some(("merchant-001".into(), false)));
        assert_eq!(store.certificate_owner(&[2; 32]).expect("lookup"), None);
        assert!(store.revoke("merchant-001").expect("revoke"));
        assert_eq!(store.certificate_owner(&[1; 32]).expect("lookup"), Some(("merchant-001".into(), true)));
        assert!(!store.revoke("merchant-009").expect("revoke"));
    }
}
