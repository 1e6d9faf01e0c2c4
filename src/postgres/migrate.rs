//! flowgate's own schema migrations, embedded in the binary: applied in
//! order, each in a transaction, recorded in `flowgate_migrations`, under an
//! advisory lock so that engines starting together apply each once.

use sqlx::PgPool;

/// The migrations, in order: version, name, SQL.
const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "inbox and outbox",
    include_str!("migrations/0001_inbox_outbox.sql"),
)];

/// The advisory lock key migrators hold (any fixed number; "flowgate" in ASCII).
const LOCK_KEY: i64 = 0x666c_6f77_6761_7465;

/// Applies the migrations not applied yet; returns the versions it applied.
pub async fn migrate(pool: &PgPool) -> Result<Vec<i32>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await?;
    let applied = apply(&mut conn).await;
    // Released however it went (the session's end would release it too).
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await;
    let applied = applied?;
    unlocked?;
    Ok(applied)
}

async fn apply(conn: &mut sqlx::PgConnection) -> Result<Vec<i32>, sqlx::Error> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS flowgate_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .execute(&mut *conn)
    .await?;
    let done: Vec<i32> = sqlx::query_scalar("SELECT version FROM flowgate_migrations")
        .fetch_all(&mut *conn)
        .await?;
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO flowgate_migrations (version, name) VALUES ($1, $2)")
            .bind(version)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied a flowgate migration");
        applied.push(*version);
    }
    Ok(applied)
}

/// The latest version this build ships.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}
