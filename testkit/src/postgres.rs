//! A private PostgreSQL database per test on the shared server
//! (127.0.0.1:5432, started by `scripts/services.sh`): created empty with a
//! unique name, dropped (connections and all) when the guard drops.
//!
//! The server is reached as `FLOWGATE_TEST_PG_URL` (default
//! `postgres://postgres:postgres@127.0.0.1:5432/postgres`, the login
//! `scripts/services.sh` makes sure of); the private database has the same
//! login and host.

use sqlx::Connection;

/// The administrative URL tests reach the server with.
pub fn server_url() -> String {
    std::env::var("FLOWGATE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// A database of this test's own; dropped on drop.
pub struct PrivateDb {
    name: String,
    url: String,
}

impl PrivateDb {
    /// Creates an empty database with a unique name.
    pub async fn create() -> PrivateDb {
        let admin = server_url();
        let name = crate::unique("fgtest").replace('-', "_").to_lowercase();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("PostgreSQL answers on FLOWGATE_TEST_PG_URL (run scripts/services.sh)");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE");
        let _ = conn.close().await;
        let mut url = url::Url::parse(&admin).expect("FLOWGATE_TEST_PG_URL is a URL");
        url.set_path(&name);
        PrivateDb {
            name,
            url: url.to_string(),
        }
    }

    /// Its URL (same login and host as the server's).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A pool of a few connections to it.
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await
            .expect("the private database answers")
    }
}

impl Drop for PrivateDb {
    fn drop(&mut self) {
        // Dropped from async tests too: a thread of its own with a small
        // runtime, so it neither blocks nor needs the caller's runtime.
        let name = self.name.clone();
        let admin = server_url();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()?;
                conn.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("warning: could not drop the test database {}", self.name);
        }
    }
}
