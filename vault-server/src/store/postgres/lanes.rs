//! The hot read path's connections, kept outside sqlx's pool, each agent at home on one of them.

use std::collections::VecDeque;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor as _};
use tokio::sync::oneshot;

/// Connections kept for the hot read (`load`, behind every GetToken) and the audit log's group
/// commit, outside sqlx's pool.
///
/// sqlx 0.8's pool pings each connection as it comes back: a spawned task and a second round
/// trip per query (found with `strace -c` on the server under vault-bench: two sends to
/// PostgreSQL per GetToken). A single-statement read outside any transaction needs neither.
///
/// A PostgreSQL backend keeps catalog entries and plans for every schema it has touched, for as
/// long as it lives, and reading an agent's tables on a backend that has not touched them costs
/// a catalog load and a plan: several times the read itself. So each agent schema has a home
/// lane (a hash of its name), and its reads queue there, in arrival order: a lane's backend
/// serves about `agents ÷ lanes` schemas and keeps them warm. A lane whose queue is empty takes
/// the read that has waited longest at another lane, so does a lane whose own first read came
/// well after another's (a stuck lane holds up no queue for long), and a read whose home is
/// busy while another lane is idle runs there at once: skewed load still uses every lane.
///
/// A connection is retired once it has touched `schemas_per_connection` agent schemas, and its
/// lane's next read opens a fresh one: each backend's memory stays bounded whatever the number
/// of agents. A read cancelled half-way drops its connection instead of putting a half-used one
/// back.
pub(super) struct ReadLanes {
    options: PgConnectOptions,
    lanes: u32,
    schemas_per_connection: usize,
    schedule: std::sync::Mutex<Schedule<Lane>>,
    /// Spreads reads that name no agent schema over the lanes.
    unhomed: std::sync::atomic::AtomicUsize,
}

/// A lane's connection and what it has served.
struct Lane {
    conn: sqlx::PgConnection,
    /// The role it was last switched to (`SET ROLE` lasts for the session, so a lane that
    /// serves one agent twice in a row switches once).
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

/// How much longer than a lane's own first read another queue's first read must have waited
/// for the lane to serve it first. Under even load the queues' first reads arrived within a few
/// milliseconds of each other, and each lane keeps to its own agents.
const OVERDUE: std::time::Duration = std::time::Duration::from_millis(50);

/// How long a lane waits for PostgreSQL to accept a new connection, like the pool's acquire.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Which lane runs which read. No I/O: the connections are opaque here (`C`), so the rules are
/// tested on their own.
struct Schedule<C> {
    slots: Vec<Slot<C>>,
}

/// One lane: busy or not, its connection while idle, and the reads waiting for it.
struct Slot<C> {
    busy: bool,
    /// Its connection while the lane is idle; `None` when none is open yet (or the last was
    /// retired or dropped), and always while busy (the reader holds it).
    idle: Option<C>,
    waiting: VecDeque<Waiter<C>>,
}

/// A read waiting for a lane.
struct Waiter<C> {
    hand: oneshot::Sender<Handoff<C>>,
    /// When it joined the queue.
    since: std::time::Instant,
    /// Waits for its home lane only (the diagnostic visiting each lane); never taken by another.
    pinned: bool,
}

/// A lane given to a read: its index, and its connection if one is open.
struct Handoff<C> {
    lane: usize,
    conn: Option<C>,
}

/// What a read gets when it asks for a lane.
enum Admit<C> {
    /// A lane, at once.
    Now(Handoff<C>),
    /// A place in a lane's queue.
    Wait(oneshot::Receiver<Handoff<C>>),
}

impl<C> Schedule<C> {
    fn new(lanes: usize) -> Self {
        Self {
            slots: (0..lanes.max(1))
                .map(|_| Slot {
                    busy: false,
                    idle: None,
                    waiting: VecDeque::new(),
                })
                .collect(),
        }
    }

    fn take(&mut self, lane: usize) -> Handoff<C> {
        let slot = &mut self.slots[lane];
        slot.busy = true;
        Handoff {
            lane,
            conn: slot.idle.take(),
        }
    }

    /// A read whose home is `home` (taken modulo the lanes), arriving at `now`: its home if
    /// idle; else, unless `pinned`, the next idle lane after its home; else a place at the back
    /// of its home's queue.
    fn admit(&mut self, home: usize, pinned: bool, now: std::time::Instant) -> Admit<C> {
        let lanes = self.slots.len();
        let home = home % lanes;
        if !self.slots[home].busy {
            return Admit::Now(self.take(home));
        }
        let idle = (1..lanes)
            .map(|step| (home + step) % lanes)
            .find(|&lane| !self.slots[lane].busy);
        if !pinned && let Some(idle) = idle {
            return Admit::Now(self.take(idle));
        }
        let (hand, waits) = oneshot::channel();
        let queue = &mut self.slots[home].waiting;
        // Reads whose callers went away leave no trace behind them.
        queue.retain(|waiter| !waiter.hand.is_closed());
        queue.push_back(Waiter {
            hand,
            since: now,
            pinned,
        });
        Admit::Wait(waits)
    }

    /// Lane `lane` is done with a read; `conn` is its connection if it is to be kept. The lane
    /// goes to the next read [`Self::next_for`] it, else it is idle. A waiter that gave up is
    /// skipped.
    fn release(&mut self, lane: usize, mut conn: Option<C>) {
        loop {
            let Some(waiter) = self.next_for(lane) else {
                let slot = &mut self.slots[lane];
                slot.busy = false;
                slot.idle = conn;
                return;
            };
            match waiter.hand.send(Handoff { lane, conn }) {
                Ok(()) => return,
                Err(back) => conn = back.conn,
            }
        }
    }

    /// The read lane `lane` serves next: the first in its own queue, unless the first of another
    /// queue has waited [`OVERDUE`] longer (that lane is stuck: reconnecting, or its read waits
    /// on a lock); with its own queue empty, the read that has waited longest at the front of
    /// another queue. A pinned read is never taken from its queue.
    fn next_for(&mut self, lane: usize) -> Option<Waiter<C>> {
        for slot in &mut self.slots {
            while slot.waiting.front().is_some_and(|w| w.hand.is_closed()) {
                slot.waiting.pop_front();
            }
        }
        let mine = self.slots[lane].waiting.front().map(|waiter| waiter.since);
        let oldest_other = self
            .slots
            .iter()
            .enumerate()
            .filter(|&(other, _)| other != lane)
            .filter_map(|(other, slot)| {
                let front = slot.waiting.front().filter(|waiter| !waiter.pinned)?;
                Some((front.since, other))
            })
            .min();
        let from = match (mine, oldest_other) {
            (Some(mine), Some((theirs, other))) if theirs + OVERDUE <= mine => other,
            (Some(_), _) => lane,
            (None, Some((_, other))) => other,
            (None, None) => return None,
        };
        self.slots[from].waiting.pop_front()
    }
}

/// A lane held by a read; given back when dropped, with the connection if the read put it back.
struct Checkout<'a> {
    lanes: &'a ReadLanes,
    lane: usize,
    conn: Option<Lane>,
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        self.lanes.schedule().release(self.lane, self.conn.take());
    }
}

/// A read's place in a queue. Dropped before its turn came (the caller went away), its place is
/// skipped; dropped just after a lane was handed to it, it gives the lane back.
struct Waiting<'a> {
    lanes: &'a ReadLanes,
    waits: oneshot::Receiver<Handoff<Lane>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.waits.close();
        if let Ok(handoff) = self.waits.try_recv() {
            self.lanes.schedule().release(handoff.lane, handoff.conn);
        }
    }
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
            schedule: std::sync::Mutex::new(Schedule::new(lanes as usize)),
            unhomed: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// How many reads run at once.
    pub(super) fn lanes(&self) -> u32 {
        self.lanes
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule<Lane>> {
        // Nothing under the lock panics (queue pushes and pops, a oneshot send), so a poisoned
        // lock still holds a consistent schedule.
        self.schedule
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A lane for a read whose home is `home`, waiting in its queue if need be.
    async fn checkout(&self, home: usize, pinned: bool) -> Result<Checkout<'_>, sqlx::Error> {
        let admitted = self
            .schedule()
            .admit(home, pinned, std::time::Instant::now());
        let handoff = match admitted {
            Admit::Now(handoff) => handoff,
            Admit::Wait(waits) => {
                let mut waiting = Waiting { lanes: self, waits };
                // Awaited in place (`Waiting` gives a lane back when dropped). A handoff's sender
                // is dropped unsent only with the schedule itself.
                (&mut waiting.waits)
                    .await
                    .map_err(|_| sqlx::Error::PoolClosed)?
            }
        };
        Ok(Checkout {
            lanes: self,
            lane: handoff.lane,
            conn: handoff.conn,
        })
    }

    /// The lane of the agent schema `sql` names; reads that name none take turns.
    fn home_of(&self, sql: &str) -> (usize, Option<u64>) {
        let schema = schema_in(sql);
        let home = match schema {
            // The remainder is below the lane count, a u32.
            Some(hash) => (hash % u64::from(self.lanes)) as usize,
            None => self
                .unhomed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        (home, schema)
    }

    /// Runs `query` as `role` (a quoted role name; `None`: the login role) on the lane of the
    /// agent schema it names, waiting for it if need be; at most one row.
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
        let (home, schema) = self.home_of(sqlx::Execute::sql(&query));
        let mut checkout = self.checkout(home, false).await?;
        let mut lane = match checkout.conn.take() {
            Some(lane) => lane,
            None => Lane {
                conn: tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    sqlx::PgConnection::connect_with(&self.options),
                )
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)??,
                role: None,
                touched: std::collections::HashSet::new(),
            },
        };
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
                checkout.conn = Some(lane);
            } else {
                // Retired: its backend has cached enough schemas. Closed off the caller's path.
                tokio::spawn(async move {
                    let _ = lane.conn.close().await;
                });
            }
        }
        result
    }

    /// How many statements naming an agent's credentials each lane's connection keeps prepared.
    pub(super) async fn prepared_agent_statements(&self) -> Result<Vec<i64>, sqlx::Error> {
        let mut each = Vec::with_capacity(self.lanes as usize);
        for lane in 0..self.lanes as usize {
            let mut checkout = self.checkout(lane, true).await?;
            let mut count = 0;
            // Taken out, so a connection that failed is dropped rather than kept.
            if let Some(mut open) = checkout.conn.take() {
                count = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_prepared_statements \
                     WHERE statement LIKE '%.credentials%'",
                )
                .fetch_one(&mut open.conn)
                .await?;
                checkout.conn = Some(open);
            }
            each.push(count);
        }
        Ok(each)
    }
}

#[cfg(test)]
mod tests {
    use super::{Admit, Handoff, ReadLanes, Schedule, schema_in};

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

    /// The lane a read was given at once; panics if it had to wait.
    fn now<C>(admitted: Admit<C>) -> Handoff<C> {
        match admitted {
            Admit::Now(handoff) => handoff,
            Admit::Wait(_) => panic!("the read waits, where a lane was free"),
        }
    }

    /// The place a read was given in a queue; panics if it got a lane at once.
    fn waits<C>(admitted: Admit<C>) -> tokio::sync::oneshot::Receiver<Handoff<C>> {
        match admitted {
            Admit::Now(handoff) => panic!("the read got lane {} at once", handoff.lane),
            Admit::Wait(waits) => waits,
        }
    }

    /// `ms` milliseconds after an arbitrary start, the same in every call of a test.
    fn at(ms: u64) -> std::time::Instant {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        *START.get_or_init(std::time::Instant::now) + std::time::Duration::from_millis(ms)
    }

    #[test]
    fn a_read_runs_on_its_home_lane_with_the_connection_it_left_there() {
        let mut schedule = Schedule::<&str>::new(4);
        let first = now(schedule.admit(6, false, at(0)));
        assert_eq!(
            (first.lane, first.conn),
            (2, None),
            "6 mod 4, nothing open yet"
        );
        schedule.release(2, Some("backend of lane 2"));
        let again = now(schedule.admit(2, false, at(1)));
        assert_eq!((again.lane, again.conn), (2, Some("backend of lane 2")));
    }

    #[test]
    fn a_read_whose_home_is_busy_runs_on_the_next_idle_lane_unless_pinned() {
        let mut schedule = Schedule::<&str>::new(4);
        let three = now(schedule.admit(3, false, at(0))).lane;
        schedule.release(three, Some("lane 3"));
        assert_eq!(now(schedule.admit(2, false, at(1))).lane, 2);
        let moved = now(schedule.admit(2, false, at(2)));
        assert_eq!(
            (moved.lane, moved.conn),
            (3, Some("lane 3")),
            "the lane after its home"
        );
        assert_eq!(
            now(schedule.admit(2, false, at(3))).lane,
            0,
            "round past the last lane"
        );
        assert_eq!(now(schedule.admit(2, false, at(4))).lane, 1);
        let mut queued = waits(schedule.admit(2, false, at(5)));
        assert!(queued.try_recv().is_err());

        let mut schedule = Schedule::<&str>::new(2);
        assert_eq!(now(schedule.admit(0, true, at(0))).lane, 0);
        let mut pinned = waits(schedule.admit(0, true, at(1)));
        assert!(pinned.try_recv().is_err(), "lane 1 idle, but pinned to 0");
        schedule.release(0, Some("lane 0"));
        let handed = pinned.try_recv().unwrap();
        assert_eq!((handed.lane, handed.conn), (0, Some("lane 0")));
    }

    #[test]
    fn a_lane_serves_its_own_queue_in_order_before_any_other() {
        let mut schedule = Schedule::<u32>::new(2);
        now(schedule.admit(0, false, at(0)));
        now(schedule.admit(1, false, at(0)));
        let mut other = waits(schedule.admit(1, false, at(1)));
        let mut first = waits(schedule.admit(0, false, at(2)));
        let mut second = waits(schedule.admit(0, false, at(3)));
        schedule.release(0, Some(10));
        assert_eq!(first.try_recv().unwrap().conn, Some(10));
        assert!(second.try_recv().is_err() && other.try_recv().is_err());
        schedule.release(0, Some(10));
        assert_eq!(second.try_recv().unwrap().lane, 0);
        assert!(
            other.try_recv().is_err(),
            "lane 1's read, older by 1 ms, waits for lane 1"
        );
        schedule.release(1, Some(11));
        assert_eq!(other.try_recv().unwrap().conn, Some(11));
    }

    #[test]
    fn a_lane_with_nothing_queued_takes_the_read_that_waited_longest_at_another() {
        let mut schedule = Schedule::<u32>::new(3);
        for home in 0..3 {
            now(schedule.admit(home, false, at(0)));
        }
        let mut younger_elsewhere = waits(schedule.admit(1, false, at(5)));
        let mut oldest = waits(schedule.admit(2, false, at(1)));
        let mut behind_it = waits(schedule.admit(2, false, at(2)));
        schedule.release(0, Some(10));
        let taken = oldest.try_recv().unwrap();
        assert_eq!((taken.lane, taken.conn), (0, Some(10)));
        assert!(younger_elsewhere.try_recv().is_err() && behind_it.try_recv().is_err());
        // A pinned read at the front of a queue keeps it: nothing else is movable, lane 0 idles.
        let mut schedule = Schedule::<u32>::new(2);
        now(schedule.admit(0, false, at(0)));
        now(schedule.admit(1, false, at(0)));
        let mut pinned = waits(schedule.admit(1, true, at(1)));
        schedule.release(0, Some(10));
        assert!(pinned.try_recv().is_err());
        assert_eq!(now(schedule.admit(0, false, at(2))).conn, Some(10));
    }

    #[test]
    fn a_stuck_lane_holds_up_its_queue_no_longer_than_overdue() {
        let mut schedule = Schedule::<u32>::new(2);
        now(schedule.admit(0, false, at(0)));
        now(schedule.admit(1, false, at(0)));
        // Lane 1 never comes back (reconnecting, or its read waits on a lock).
        let mut stuck = waits(schedule.admit(1, false, at(0)));
        let mut soon = waits(schedule.admit(0, false, at(10)));
        let late_ms = 10 + super::OVERDUE.as_millis() as u64;
        let mut late = waits(schedule.admit(0, false, at(late_ms)));
        schedule.release(0, Some(10));
        assert!(
            soon.try_recv().is_ok(),
            "10 ms younger than lane 1's: its own comes first"
        );
        assert!(stuck.try_recv().is_err());
        schedule.release(0, Some(10));
        assert_eq!(
            stuck.try_recv().unwrap().lane,
            0,
            "overdue at the stuck lane: taken"
        );
        assert!(late.try_recv().is_err());
        schedule.release(0, Some(10));
        assert_eq!(late.try_recv().unwrap().lane, 0);
    }

    #[test]
    fn a_read_that_gave_up_waiting_is_skipped_and_loses_no_connection() {
        let mut schedule = Schedule::<u32>::new(1);
        now(schedule.admit(0, false, at(0)));
        drop(waits(schedule.admit(0, false, at(1))));
        let mut next = waits(schedule.admit(0, false, at(2)));
        schedule.release(0, Some(10));
        assert_eq!(next.try_recv().unwrap().conn, Some(10));
        for ms in 3..100 {
            drop(waits(schedule.admit(0, false, at(ms))));
        }
        assert_eq!(
            schedule.slots[0].waiting.len(),
            1,
            "only the last gone caller is left"
        );
        schedule.release(0, Some(10));
        assert_eq!(
            now(schedule.admit(0, false, at(100))).conn,
            Some(10),
            "idle, with its connection"
        );
    }

    #[tokio::test]
    async fn a_read_dropped_as_its_lane_is_handed_to_it_gives_the_lane_back() {
        let lanes = ReadLanes::new(sqlx::postgres::PgConnectOptions::new(), 1, 16);
        now(lanes.schedule().admit(0, false, at(0)));
        let mut checkout = Box::pin(lanes.checkout(0, false));
        assert!(
            futures_util::poll!(&mut checkout).is_pending(),
            "lane 0 is busy"
        );
        lanes.schedule().release(0, None);
        // Handed over, but never polled again: dropping it must not leave the lane busy.
        drop(checkout);
        assert!(!lanes.schedule().slots[0].busy);
        let checkout = lanes.checkout(0, false).await.unwrap();
        assert_eq!(checkout.lane, 0);
        drop(checkout);
        assert!(
            !lanes.schedule().slots[0].busy,
            "a checkout gives its lane back when dropped"
        );
    }
}
