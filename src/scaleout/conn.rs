//! Waiting out a PostgreSQL outage: which errors mean the database is unreachable, and a
//! connection that is opened again until a transaction goes through.

use std::time::{Duration, Instant};

use postgres::Client;

use super::pg::{self, connect, transient, Commit, Committer, Days, PgError};

impl PgError {
    /// The database is down, restarting, refusing connections or cut the connection: nothing
    /// is wrong with the request, and trying again once it is back may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Db(e) => transient(e),
            PgError::Unreachable(_) => true,
            PgError::Fenced(..) | PgError::Refused(_) => false,
        }
    }
}

/// A connection that is opened again when the database went away. [`Conn::attempt`] runs a
/// transaction once, or refuses at once while it waits out the backoff after an outage;
/// [`Conn::retry`] runs one until it succeeds. Both report the outage (log, `/healthz`,
/// `adclick_commits_stalled`).
pub struct Conn {
    url: String,
    client: Option<Client>,
    /// Set when the process stops: a retry then gives up.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// While the database is unreachable: the current backoff and when to try next.
    failing: Option<(Duration, Instant)>,
    /// This connection's entry in the process's stalled reasons.
    key: u64,
}

/// Numbers the connections of a process (see `telemetry::set_stalled`).
static NEXT_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// First and longest wait between two attempts while the database is unreachable.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Conn {
    /// Not connected yet: the first use connects.
    pub fn lazy(url: &str, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Conn {
        let key = NEXT_KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Conn { url: url.to_owned(), client: None, stop, failing: None, key }
    }

    /// Runs `f` once on a connection (opened first if need be). While the database has been
    /// unreachable (see [`PgError::is_transient`]) and the backoff since the last failure has
    /// not passed, refuses at once with a transient error instead. `f` must be safe to run
    /// again after a failure whose commit may have landed.
    pub fn attempt<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Client) -> Result<T, PgError>,
    ) -> Result<T, PgError> {
        if let Some((_, next)) = self.failing {
            if Instant::now() < next {
                return Err(PgError::Unreachable(format!("{what}: waiting for PostgreSQL")));
            }
        }
        let result = match self.client.as_mut().filter(|c| !c.is_closed()) {
            Some(client) => f(client),
            None => connect(&self.url).and_then(|mut client| {
                let out = f(&mut client);
                self.client = Some(client);
                out
            }),
        };
        match result {
            Err(e) if e.is_transient() => {
                let backoff = match self.failing {
                    Some((backoff, _)) => (backoff * 2).min(MAX_BACKOFF),
                    None => {
                        tracing::warn!("{what}: {e}; retrying until PostgreSQL is back");
                        crate::telemetry::set_stalled(self.key, Some(format!("{what}: {e}")));
                        FIRST_BACKOFF
                    }
                };
                self.failing = Some((backoff, Instant::now() + backoff));
                self.client = None;
                Err(e)
            }
            other => {
                if self.failing.take().is_some() {
                    tracing::info!("{what}: PostgreSQL is back");
                    crate::telemetry::set_stalled(self.key, None);
                }
                other
            }
        }
    }

    /// Runs `f` until it succeeds or fails for another reason than an unreachable database,
    /// waiting out the backoff between attempts; gives up (returning the error) once the
    /// process stops.
    pub fn retry<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Client) -> Result<T, PgError>,
    ) -> Result<T, PgError> {
        loop {
            match self.attempt(what, &mut f) {
                Err(e) if e.is_transient() => {
                    if self.stop.load(std::sync::atomic::Ordering::Acquire) {
                        return Err(e);
                    }
                    if let Some((_, next)) = self.failing {
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                }
                other => return other,
            }
        }
    }
}

/// One attempt: a commit the database cannot take now is kept by the caller and tried again
/// (see `aggregate::Owned::commit`), while the aggregator goes on polling its partitions.
impl Committer for Conn {
    fn commit(&mut self, days: &mut Days, c: &Commit<'_>) -> Result<(), PgError> {
        self.attempt("committing results", |client| pg::commit(client, days, c))
    }
}
