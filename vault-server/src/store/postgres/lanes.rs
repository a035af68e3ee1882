//! The hot read path's connections, kept outside sqlx's pool.

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor as _};

/// Connections kept for the hot read (`load`, behind every GetToken), outside sqlx's pool.
///
/// sqlx 0.8's pool pings each connection as it comes back: a spawned task and a second round
/// trip per query (found with `strace -c` on the server under vault-bench: two sends to
/// PostgreSQL per GetToken). A single-statement read outside any transaction needs neither.
/// A fair semaphore admits at most `lanes` reads at once, in arrival order; each takes an idle
/// connection (or opens one) for the query. A read cancelled half-way drops its connection
/// instead of putting a half-used one back.
pub(super) struct ReadLanes {
    options: PgConnectOptions,
    lanes: u32,
    permits: tokio::sync::Semaphore,
    /// Idle connections, each with the role it was last switched to (`SET ROLE` lasts for the
    /// session, so a connection that stays with one agent switches only once).
    idle: std::sync::Mutex<Vec<(sqlx::PgConnection, Option<String>)>>,
}

/// How many rows a read wants.
#[derive(Clone, Copy)]
enum Rows {
    AtMostOne,
    All,
}

impl std::fmt::Debug for ReadLanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadLanes")
            .field("lanes", &self.lanes)
            .finish_non_exhaustive()
    }
}

impl ReadLanes {
    pub(super) fn new(options: PgConnectOptions, lanes: u32) -> Self {
        let lanes = lanes.max(1);
        Self {
            options,
            lanes,
            permits: tokio::sync::Semaphore::new(lanes as usize),
            idle: std::sync::Mutex::new(Vec::with_capacity(lanes as usize)),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(sqlx::PgConnection, Option<String>)>> {
        // Only pushes and pops happen under the lock; a panic cannot leave the list half-done.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle connection, preferring one already switched to `role`.
    async fn connection(
        &self,
        role: Option<&str>,
    ) -> Result<(sqlx::PgConnection, Option<String>), sqlx::Error> {
        let idle = {
            let mut idle = self.idle();
            let same = idle.iter().rposition(|(_, r)| r.as_deref() == role);
            match same {
                Some(at) => Some(idle.swap_remove(at)),
                None => idle.pop(),
            }
        };
        match idle {
            Some(idle) => Ok(idle),
            None => Ok((sqlx::PgConnection::connect_with(&self.options).await?, None)),
        }
    }

    /// Runs `query` as `role` (a quoted role name; `None`: the login role) on an idle
    /// connection, waiting for one if all are busy; at most one row.
    pub(super) async fn fetch_optional(
        &self,
        role: Option<&str>,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Option<sqlx::postgres::PgRow>, sqlx::Error> {
        Ok(self.fetch(role, query, Rows::AtMostOne).await?.pop())
    }

    /// As [`Self::fetch_optional`], every row.
    pub(super) async fn fetch_all(
        &self,
        role: Option<&str>,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<sqlx::postgres::PgRow>, sqlx::Error> {
        self.fetch(role, query, Rows::All).await
    }

    async fn fetch(
        &self,
        role: Option<&str>,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        rows: Rows,
    ) -> Result<Vec<sqlx::postgres::PgRow>, sqlx::Error> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let (mut conn, mut current) = self.connection(role).await?;
        let result = async {
            if current.as_deref() != role {
                let switch = match role {
                    Some(role) => format!("SET ROLE {role}"),
                    None => "RESET ROLE".to_string(),
                };
                // Forget the old role first: if the switch fails, the connection is dropped.
                current = None;
                conn.execute(switch.as_str()).await?;
                current = role.map(str::to_string);
            }
            match rows {
                Rows::AtMostOne => Ok(query.fetch_optional(&mut conn).await?.into_iter().collect()),
                Rows::All => query.fetch_all(&mut conn).await,
            }
        }
        .await;
        // After any error the connection is not trusted: a terminated backend, for one, first
        // answers with a database error and only then closes. Errors here are rare (the agent
        // schema is known to exist), so reconnecting costs little.
        if result.is_ok() {
            self.idle().push((conn, current));
        }
        result
    }

    /// How many statements naming an agent's credentials the idle connections keep prepared.
    pub(super) async fn prepared_agent_statements(&self) -> Result<i64, sqlx::Error> {
        let _all = self
            .permits
            .acquire_many(self.lanes)
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let connections = std::mem::take(&mut *self.idle());
        let mut total = 0;
        for (mut conn, role) in connections {
            let count: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_prepared_statements \
                 WHERE statement LIKE '%.credentials%'",
            )
            .fetch_one(&mut conn)
            .await?;
            total += count;
            self.idle().push((conn, role));
        }
        Ok(total)
    }
}
