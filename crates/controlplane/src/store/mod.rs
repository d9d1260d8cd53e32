//! The database: one schema and one set of queries for SQLite and
//! PostgreSQL through sqlx's `Any` driver (`$n` placeholders, TEXT and
//! BIGINT only, epoch-millisecond times, ids made here).
//!
//! Writes go through [`Store::write`], one transaction per API mutation. On
//! SQLite a write transaction starts with `BEGIN IMMEDIATE` and writers of
//! this process queue on an async mutex first, so two writers never meet in
//! SQLite's lock (where a deferred transaction upgrading to a writer fails
//! instead of waiting). PostgreSQL runs at READ COMMITTED; races that matter
//! are settled by unique keys (mapped to [`StoreError::Conflict`]) and row
//! locks taken by the first `UPDATE` of a transaction.

pub mod acme;
pub mod activity;
pub mod audit;
pub mod deliveries;
pub mod deployments;
pub mod domains;
pub mod env;
pub mod limits;
pub mod projects;
pub mod tokens;

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor, Row, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A unique key was already taken (two requests raced, or a name is used).
    #[error("{0}")]
    Conflict(String),
    /// A row holds something this code never writes.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the write failed for want of space: SQLite's `SQLITE_FULL`,
    /// PostgreSQL's `disk_full` (53100), or `ENOSPC`/`EDQUOT` from a file.
    pub fn is_storage_full(&self) -> bool {
        match self {
            StoreError::Database(e) => sqlx_is_storage_full(e),
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => sqlx_is_storage_full(e),
            _ => false,
        }
    }
}

fn sqlx_is_storage_full(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code();
            // SQLite answers its primary code (13) or, with extended codes
            // on, the same low byte; PostgreSQL the SQLSTATE.
            let sqlite_full = code.as_deref().and_then(|c| c.parse::<i32>().ok()).is_some_and(|c| c & 0xff == 13);
            sqlite_full || code.as_deref() == Some("53100") || db.message().contains("database or disk is full")
        }
        sqlx::Error::Io(io) => is_io_storage_full(io),
        _ => false,
    }
}

/// `ENOSPC` (no space left) or `EDQUOT` (a quota reached).
pub fn is_io_storage_full(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// SQLite only: this process's writers queue here.
    write_lock: Option<Arc<Mutex<()>>>,
    /// SQLite only: the database file.
    sqlite_path: Option<std::path::PathBuf>,
}

/// A write transaction. Dropped without [`WriteTx::commit`], it rolls back.
pub struct WriteTx {
    // Declared before the guard so the transaction is given back first.
    tx: Transaction<'static, Any>,
    _guard: Option<OwnedMutexGuard<()>>,
}

impl WriteTx {
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

impl std::ops::Deref for WriteTx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Store {
    /// Connects to `database_url` (`postgres://…`), or to the SQLite file at
    /// `sqlite_path` when it is `None`, and brings the schema up to date.
    pub async fn open(database_url: Option<&str>, sqlite_path: &Path) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (url, backend) = match database_url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                (url.to_owned(), Backend::Postgres)
            }
            Some(url) => {
                return Err(StoreError::Database(sqlx::Error::Configuration(
                    format!("unsupported database URL scheme in {:?} (expected postgres://)", redact(url)).into(),
                )));
            }
            None => {
                // Made here, 0600, before SQLite makes it under the process
                // umask: its -wal and -shm take the database file's mode.
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(sqlite_path)
                    .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
                (sqlite_url(sqlite_path)?, Backend::Sqlite)
            }
        };
        let options: AnyConnectOptions = url.parse()?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // sqlx sets foreign_keys=ON and a 5 s busy timeout
                        // already; say so here so it never silently changes.
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                    }
                    Ok(())
                })
            })
            .before_acquire(move |conn, _| {
                Box::pin(async move {
                    // A write that SQLite refused mid-transaction (SQLITE_FULL
                    // rolls back by itself) leaves sqlx's own transaction count
                    // at one, as its ROLLBACK then fails: every later
                    // `BEGIN IMMEDIATE` on that connection would fail too.
                    // Such a connection is closed and replaced (the rollback
                    // was flushed when it was released, so the count is true).
                    Ok(backend != Backend::Sqlite || !conn.is_in_transaction())
                })
            })
            .connect_with(options)
            .await?;
        if backend == Backend::Sqlite {
            // Persistent in the file; readers then never block the writer.
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL").fetch_one(&pool).await?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(target: "isocloud::controlplane", mode, "SQLite refused WAL mode");
            }
        }
        MIGRATOR.run(&pool).await?;
        let write_lock = (backend == Backend::Sqlite).then(|| Arc::new(Mutex::new(())));
        let sqlite_path = (backend == Backend::Sqlite).then(|| sqlite_path.to_owned());
        Ok(Self { pool, backend, write_lock, sqlite_path })
    }

    /// What the database takes: SQLite's file with its WAL and shared
    /// memory, or PostgreSQL's `pg_database_size`.
    pub async fn size_bytes(&self) -> Result<u64> {
        match &self.sqlite_path {
            Some(path) => {
                let mut total = 0;
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    total += tokio::fs::metadata(&file).await.map_or(0, |m| m.len());
                }
                Ok(total)
            }
            None => {
                let row = sqlx::query("SELECT CAST(pg_database_size(current_database()) AS BIGINT) AS size")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(u64::try_from(col::<i64>(&row, "size")?).unwrap_or(0))
            }
        }
    }

    /// Starts a write transaction.
    pub async fn write(&self) -> Result<WriteTx> {
        let guard = match &self.write_lock {
            Some(lock) => Some(Arc::clone(lock).lock_owned().await),
            None => None,
        };
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(WriteTx { tx, _guard: guard })
    }

    /// A connection for reads.
    pub async fn read(&self) -> Result<sqlx::pool::PoolConnection<Any>> {
        Ok(self.pool.acquire().await?)
    }
}

/// `sqlite://<percent-encoded absolute path>?mode=rwc`.
fn sqlite_url(path: &Path) -> Result<String> {
    let url = url::Url::from_file_path(path).map_err(|()| {
        StoreError::Database(sqlx::Error::Configuration(
            format!("the SQLite path {} must be absolute", path.display()).into(),
        ))
    })?;
    Ok(format!("sqlite://{}?mode=rwc", url.path()))
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Was this a unique-key violation (someone else took the name first)?
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Maps a unique-key violation to a [`StoreError::Conflict`] saying `what`.
pub fn conflict_on_unique(what: impl FnOnce() -> String) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| if is_unique_violation(&e) { StoreError::Conflict(what()) } else { StoreError::Database(e) }
}

/// Marks a change to routing or certificates so every node reloads.
/// What a routing change touched (see `migrations/0005_routing_changes.sql`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Touched {
    /// Created, renamed, deleted or promoted.
    Project(String),
    /// Became ready, or is gone.
    Deployment(String),
    /// Attached or detached, verified, deleted, or its certificate changed.
    Domain(String),
}

impl Touched {
    fn parts(&self) -> (&'static str, &str) {
        match self {
            Touched::Project(id) => ("project", id),
            Touched::Deployment(id) => ("deployment", id),
            Touched::Domain(domain) => ("domain", domain),
        }
    }
}

/// Records a change that moves routing: the next routing generation, and
/// what it touched, in the caller's transaction.
pub async fn note_routing_change(conn: &mut AnyConnection, touched: &Touched) -> Result<()> {
    // RETURNING on the bumped row: PostgreSQL holds its lock until commit,
    // so generations are taken in commit order (SQLite has one writer).
    let row = sqlx::query(
        "UPDATE meta SET routing_generation = routing_generation + 1 WHERE id = 1 RETURNING routing_generation",
    )
    .fetch_one(&mut *conn)
    .await?;
    let generation: i64 = col(&row, "routing_generation")?;
    let (kind, subject) = touched.parts();
    sqlx::query("INSERT INTO routing_changes (generation, kind, subject, changed_at_ms) VALUES ($1, $2, $3, $4)")
        .bind(generation)
        .bind(kind)
        .bind(subject)
        .bind(crate::time::now_ms())
        .execute(conn)
        .await?;
    Ok(())
}

/// The changes after generation `after`, oldest first, at most `limit`.
pub async fn routing_changes_since(conn: &mut AnyConnection, after: i64, limit: i64) -> Result<Vec<(i64, Touched)>> {
    let rows = routing_changes_since_sql(after, limit).query().fetch_all(conn).await?;
    rows.iter()
        .map(|row| {
            let subject: String = col(row, "subject")?;
            let touched = match col::<String>(row, "kind")?.as_str() {
                "project" => Touched::Project(subject),
                "deployment" => Touched::Deployment(subject),
                "domain" => Touched::Domain(subject),
                other => return Err(StoreError::Corrupt(format!("routing change of unknown kind {other:?}"))),
            };
            Ok((col(row, "generation")?, touched))
        })
        .collect()
}

fn routing_changes_since_sql(after: i64, limit: i64) -> Sql {
    let mut sql = Sql::new("SELECT generation, kind, subject FROM routing_changes WHERE generation > ");
    sql.bind(Arg::Int(after)).push(" ORDER BY generation LIMIT ").bind(Arg::Int(limit));
    sql
}

/// The store's queries on the paths that must cost the same at any size
/// (a boot, a deploy, a routing change, a page of a list), as the store
/// runs them, with sample arguments: a test reads each one's plan on
/// SQLite and PostgreSQL and fails on a scan of a whole table.
#[doc(hidden)]
pub fn hot_queries(postgres: bool) -> Vec<(&'static str, Sql)> {
    let id = "aaaaaaaaaaaa";
    vec![
        ("deployment by id", deployments::get_sql(id)),
        ("a project's deployments, newest first", deployments::list_by_project_sql("p1", None, 51)),
        ("a project's deployments, next page", deployments::list_by_project_sql("p1", Some((1, id)), 51)),
        ("a deployment's files", deployments::files_sql(postgres, id)),
        ("a blob of a deployment", deployments::has_blob_sql(id, &"0".repeat(64))),
        ("a deployment's routing", deployments::routing_of_sql(id)),
        ("a project's ready deployments", deployments::ready_of_project_sql("p1")),
        ("projects by name, a page", projects::list_sql(Some("m"), 101)),
        ("project by name", projects::by_name_sql("hello")),
        ("a project's domains", domains::of_project_sql("p1")),
        ("domains by name, a page", domains::page_sql(None, Some("m.example"), 101)),
        ("a project's domains by name, a page", domains::page_sql(Some("p1"), Some("m.example"), 101)),
        ("routing changes since a generation", routing_changes_since_sql(41, 10_001)),
        ("token by its hash (every API request)", tokens::by_hash_sql(&"0".repeat(64))),
        ("tokens by name, a page", tokens::list_sql(Some("ci"), 101)),
        ("audit entries, newest first", audit::list_sql(None, None, 101)),
        ("audit entries, next page", audit::list_sql(None, Some("000001700000000-abc"), 101)),
        ("a project's audit entries, a page", audit::list_sql(Some("p1"), Some("000001700000000-abc"), 101)),
        ("audit entries past retention", audit::prune_sql(1_700_000_000_000)),
        (
            "a deployment's newest logs",
            activity::logs_sql(
                &activity::LogFilter { deployment_id: Some(id.into()), ..Default::default() },
                100,
                true,
            ),
        ),
        (
            "a project's logs since a time",
            activity::logs_sql(
                &activity::LogFilter { project_id: Some("p1".into()), since_ms: Some(1), ..Default::default() },
                100,
                true,
            ),
        ),
        (
            "following a deployment's logs",
            activity::logs_sql(
                &activity::LogFilter { deployment_id: Some(id.into()), after_id: Some(5), ..Default::default() },
                100,
                false,
            ),
        ),
    ]
}

/// Forgets changes recorded before `before_ms` (a node further behind
/// reloads whole).
pub async fn prune_routing_changes(conn: &mut AnyConnection, before_ms: i64) -> Result<u64> {
    let done =
        sqlx::query("DELETE FROM routing_changes WHERE changed_at_ms < $1").bind(before_ms).execute(conn).await?;
    Ok(done.rows_affected())
}

pub async fn routing_generation(conn: &mut AnyConnection) -> Result<i64> {
    let row = sqlx::query("SELECT routing_generation FROM meta WHERE id = 1").fetch_one(conn).await?;
    Ok(row.try_get::<i64, _>(0)?)
}

/// A value bound into a dynamically built statement.
#[derive(Debug, Clone)]
pub enum Arg {
    Text(String),
    Int(i64),
}

/// SQL put together from optional filters, with `$n` placeholders (the only
/// style both SQLite and PostgreSQL read).
#[derive(Debug, Default)]
pub struct Sql {
    pub text: String,
    pub args: Vec<Arg>,
}

impl Sql {
    pub fn new(text: &str) -> Self {
        Self { text: text.to_owned(), args: Vec::new() }
    }

    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder bound to `arg`.
    pub fn bind(&mut self, arg: Arg) -> &mut Self {
        self.args.push(arg);
        self.text.push_str(&format!("${}", self.args.len()));
        self
    }

    pub fn query(&self) -> sqlx::query::Query<'_, Any, sqlx::any::AnyArguments<'_>> {
        let mut query = sqlx::query(&self.text);
        for arg in &self.args {
            query = match arg {
                Arg::Text(s) => query.bind(s.as_str()),
                Arg::Int(i) => query.bind(*i),
            };
        }
        query
    }
}

/// Reads a column, naming it when the row does not fit.
pub fn col<'r, T>(row: &'r sqlx::any::AnyRow, name: &str) -> Result<T>
where
    T: sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    row.try_get::<T, _>(name).map_err(|e| StoreError::Corrupt(format!("column {name}: {e}")))
}
