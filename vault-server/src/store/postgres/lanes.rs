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
///
/// A PostgreSQL backend keeps catalog entries and plans for every schema it has touched, for
/// as long as it lives: with many agents, its memory grows with the agents it served. So a
/// connection is retired once it has touched `schemas_per_connection` agent schemas, and the
/// next read opens a fresh one: each backend's memory stays bounded whatever the number of
/// agents.
pub(super) struct ReadLanes {
    options: PgConnectOptions,
    lanes: u32,
    schemas_per_connection: usize,
    permits: tokio::sync::Semaphore,
    /// Idle connections, each with the role it was last switched to (`SET ROLE` lasts for the
    /// session, so a connection that stays with one agent switches only once).
    idle: std::sync::Mutex<Vec<Lane>>,
}

/// An idle read connection and what it has served.
struct Lane {
    conn: sqlx::PgConnection,
    /// The role it was last switched to.
    role: Option<String>,
    /// The agent schemas it has touched (a hash of each name).
    touched: std::collections::HashSet<u64>,
}

/// A hash of the first agent schema `sql` names (`agent_` and 40 hex digits), if it names one.
fn schema_in(sql: &str) -> Option<u64> {
    let at = sql.find("\"agent_")? + 1;
    let name = sql.get(at..at + 46)?;
    let mut hash = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(name, &mut hash);
    Some(std::hash::Hasher::finish(&hash))
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
    pub(super) fn new(
        options: PgConnectOptions,
        lanes: u32,
        schemas_per_connection: usize,
    ) -> Self {
        let lanes = lanes.max(1);
        Self {
            options,
            lanes,
            schemas_per_connection: schemas_per_connection.max(1),
            permits: tokio::sync::Semaphore::new(lanes as usize),
            idle: std::sync::Mutex::new(Vec::with_capacity(lanes as usize)),
        }
    }

    /// How many reads run at once.
    pub(super) fn lanes(&self) -> u32 {
        self.lanes
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Lane>> {
        // Only pushes and pops happen under the lock; a panic cannot leave the list half-done.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle connection, preferring one already switched to `role`.
    async fn connection(&self, role: Option<&str>) -> Result<Lane, sqlx::Error> {
        let idle = {
            let mut idle = self.idle();
            let same = idle.iter().rposition(|lane| lane.role.as_deref() == role);
            match same {
                Some(at) => Some(idle.swap_remove(at)),
                None => idle.pop(),
            }
        };
        match idle {
            Some(idle) => Ok(idle),
            None => Ok(Lane {
                conn: sqlx::PgConnection::connect_with(&self.options).await?,
                role: None,
                touched: std::collections::HashSet::new(),
            }),
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
        let mut lane = self.connection(role).await?;
        let schema = schema_in(sqlx::Execute::sql(&query));
        let result = async {
            if lane.role.as_deref() != role {
                let switch = match role {
                    Some(role) => format!("SET ROLE {role}"),
                    None => "RESET ROLE".to_string(),
                };
                // Forget the old role first: if the switch fails, the connection is dropped.
                lane.role = None;
                lane.conn.execute(switch.as_str()).await?;
                lane.role = role.map(str::to_string);
            }
            match rows {
                Rows::AtMostOne => Ok(query
                    .fetch_optional(&mut lane.conn)
                    .await?
                    .into_iter()
                    .collect()),
                Rows::All => query.fetch_all(&mut lane.conn).await,
            }
        }
        .await;
        // After any error the connection is not trusted: a terminated backend, for one, first
        // answers with a database error and only then closes. Errors here are rare (the agent
        // schema is known to exist), so reconnecting costs little.
        if result.is_ok() {
            lane.touched.extend(schema);
            if lane.touched.len() < self.schemas_per_connection {
                self.idle().push(lane);
            } else {
                // Retired: its backend has cached enough schemas. Closed off the caller's path.
                tokio::spawn(async move {
                    let _ = lane.conn.close().await;
                });
            }
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
        for mut lane in connections {
            let count: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_prepared_statements \
                 WHERE statement LIKE '%.credentials%'",
            )
            .fetch_one(&mut lane.conn)
            .await?;
            total += count;
            self.idle().push(lane);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::schema_in;

    #[test]
    fn a_statement_is_known_by_the_agent_schema_it_names() {
        let a = format!("SELECT 1 FROM \"agent_{}\".credentials", "a".repeat(40));
        let b = format!("UPDATE \"agent_{}\".audit_head SET x = 1", "b".repeat(40));
        assert!(schema_in(&a).is_some());
        assert_ne!(schema_in(&a), schema_in(&b));
        assert_eq!(
            schema_in(&a),
            schema_in(&format!(
                "SELECT 2 FROM \"agent_{}\".audit_log",
                "a".repeat(40)
            ))
        );
        assert_eq!(schema_in("SELECT last_hash FROM vault.audit_head"), None);
        assert_eq!(schema_in("SELECT \"agent_12"), None, "a name cut short");
    }
}
