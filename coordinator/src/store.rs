//! The coordinator's durable state in one SQLite file: the merchant registry (more tables
//! arrive with rounds, adapters and the ledger). Schema migrations are versioned with
//! `PRAGMA user_version` and applied in one transaction at open.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

/// Each entry migrates the schema from version `i` to `i + 1`.
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
}

/// A merchant as the registry records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerchantRecord {
    pub merchant_id: String,
    pub display_name: String,
    pub signing_public_key: [u8; 32],
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
            "INSERT INTO merchants (merchant_id, display_name, signing_public_key, registered_at)
             VALUES (?1, ?2, ?3, unixepoch())
             ON CONFLICT (merchant_id) DO UPDATE SET
                 display_name = excluded.display_name,
                 signing_public_key = excluded.signing_public_key",
            params![record.merchant_id, record.display_name, record.signing_public_key.as_slice()],
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
            "SELECT merchant_id, display_name, signing_public_key FROM merchants ORDER BY merchant_id",
        )?;
        let rows = stmt.query_map([], |r| {
            let key: Vec<u8> = r.get(2)?;
            let mut signing_public_key = [0u8; 32];
            signing_public_key.copy_from_slice(&key);
            Ok(MerchantRecord { merchant_id: r.get(0)?, display_name: r.get(1)?, signing_public_key })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_survives_reopening_and_migrations_are_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("guild.db");
        let record = MerchantRecord {
            merchant_id: "shop-1".into(),
            display_name: "Shop One".into(),
            signing_public_key: [7; 32],
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
}
