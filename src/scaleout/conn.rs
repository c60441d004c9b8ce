//! Waiting out a PostgreSQL outage: which errors mean the database is unreachable, and a
//! connection that is opened again until a transaction goes through.

use std::time::Duration;

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

/// A connection that is opened again when the database went away: [`Conn::retry`] runs a
/// transaction until it succeeds, waiting with backoff while the database is unreachable, and
/// reports the outage (log, `adclick_commits_stalled`).
pub struct Conn {
    url: String,
    client: Option<Client>,
    /// Set when the process stops: a retry then gives up.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Longest wait between two attempts while the database is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Conn {
    /// Not connected yet: the first use connects.
    pub fn lazy(url: &str, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Conn {
        Conn { url: url.to_owned(), client: None, stop }
    }

    /// Runs `f` on a connection. While the database is unreachable (see
    /// [`PgError::is_transient`]) it reconnects and runs `f` again, with backoff, until it
    /// succeeds, fails otherwise, or the process stops (then the error is returned). `f` must
    /// be safe to run again after a failure whose commit may have landed.
    pub fn retry<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Client) -> Result<T, PgError>,
    ) -> Result<T, PgError> {
        let mut backoff = Duration::from_millis(100);
        let mut failing = false;
        loop {
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
                    if !failing {
                        tracing::warn!("{what}: {e}; retrying until PostgreSQL is back");
                        crate::telemetry::set_stalled(Some(format!("{what}: {e}")));
                        failing = true;
                    }
                    self.client = None;
                    if self.stop.load(std::sync::atomic::Ordering::Acquire) {
                        return Err(e);
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                other => {
                    if failing {
                        tracing::info!("{what}: PostgreSQL is back");
                        crate::telemetry::set_stalled(None);
                    }
                    return other;
                }
            }
        }
    }
}

impl Committer for Conn {
    fn commit(&mut self, days: &mut Days, c: &Commit<'_>) -> Result<(), PgError> {
        self.retry("committing results", |client| pg::commit(client, days, c))
    }
}
