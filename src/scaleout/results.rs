//! The query role's reads from PostgreSQL, on a small pool of connections: the results reader
//! of the HTTP API in the scale-out deployment.

use std::sync::Mutex;
use std::time::Duration;

use super::pg::{self, PgError};
use crate::api::{Health, HealthStatus, ReadError, Results};
use crate::engine::{Slot, Watermark};
use crate::event::Minute;
use crate::rank::Ranked;

/// Longest a query role's statement may run.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The query role's reads, on a small pool of connections.
pub struct PgResults {
    url: String,
    pool: Mutex<Vec<postgres::Client>>,
    partitions: u32,
    top_n: usize,
}

impl PgResults {
    /// Connects once to check the URL; a database that is down only makes queries answer 503
    /// until it is back.
    pub fn new(url: &str, partitions: u32, top_n: usize) -> Result<PgResults, PgError> {
        let pool = match Self::connect(url) {
            Ok(first) => vec![first],
            Err(e) if e.is_transient() => {
                tracing::warn!("{e}; queries answer 503 until PostgreSQL is back");
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        Ok(PgResults { url: url.into(), pool: Mutex::new(pool), partitions, top_n })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, PgError>,
    ) -> Result<T, PgError> {
        let taken = self.pool.lock().expect("not poisoned").pop();
        let mut client = match taken {
            Some(c) if !c.is_closed() => c,
            _ => Self::connect(&self.url)?,
        };
        let out = f(&mut client);
        if out.is_ok() {
            let mut pool = self.pool.lock().expect("not poisoned");
            if pool.len() < 8 {
                pool.push(client);
            }
        }
        out
    }

    /// A query connection: no statement may run longer than [`QUERY_TIMEOUT`], so that one
    /// request (popular ads over a day of a million ads, say) cannot hold the database for long;
    /// it is answered 503 instead.
    fn connect(url: &str) -> Result<postgres::Client, PgError> {
        let mut c = pg::connect(url)?;
        c.batch_execute(&format!("SET statement_timeout = {}", QUERY_TIMEOUT.as_millis()))?;
        Ok(c)
    }

    /// The watermark over every partition (see [`pg::watermark`]).
    pub fn watermark(&self) -> Result<Watermark, PgError> {
        self.with(|c| pg::watermark(c, self.partitions).map(|(w, _)| w))
    }

    /// As the embedded store's `series`: the watermark is read first, so `final` never claims
    /// more than the counts read after it show.
    pub fn series(
        &self,
        ad: &str,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), PgError> {
        self.with(|c| {
            let (w, _) = pg::watermark(c, self.partitions)?;
            Ok((pg::series(c, ad, slot, from, to)?, w))
        })
    }

    pub fn totals(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), PgError> {
        self.with(|c| {
            let (w, _) = pg::watermark(c, self.partitions)?;
            Ok((pg::totals(c, slot, from, to)?, w))
        })
    }

    pub fn popular(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
        n: usize,
    ) -> Result<(Vec<Ranked>, Watermark), PgError> {
        self.with(|c| {
            let (w, engines) = pg::watermark(c, self.partitions)?;
            Ok((pg::popular(c, slot, from, to, n, self.top_n, engines)?, w))
        })
    }
}

/// A database error as queries answer it: 503, retry later.
fn unavailable(e: PgError) -> ReadError {
    ReadError::Unavailable(Box::new(e))
}

impl Results for PgResults {
    fn series(
        &self,
        ad: &str,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), ReadError> {
        PgResults::series(self, ad, slot, from, to).map_err(unavailable)
    }

    fn popular(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
        n: usize,
    ) -> Result<(Vec<Ranked>, Watermark), ReadError> {
        PgResults::popular(self, slot, from, to, n).map_err(unavailable)
    }

    fn totals(
        &self,
        slot: Slot,
        from: Minute,
        to: Minute,
    ) -> Result<(Vec<(Minute, u64)>, Watermark), ReadError> {
        PgResults::totals(self, slot, from, to).map_err(unavailable)
    }

    fn health(&self) -> Health {
        match self.watermark() {
            Ok(w) => Health { watermark: Some(w), ..Health::new(HealthStatus::Ok) },
            Err(e) => {
                Health { error: Some(e.to_string()), ..Health::new(HealthStatus::Unavailable) }
            }
        }
    }
}
