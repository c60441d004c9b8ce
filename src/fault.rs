//! Faults: [`fatal`], the one way adclick stops itself after a failure it must not go on from,
//! [`chain`], an error with its causes in one line, and crash points for tests.
//!
//! Crash points: `ADCLICK_FAULT=<point>:<n>` makes the process abort (as abruptly as
//! `kill -9`: no unwinding, no flushing) the n-th time it reaches `<point>`. Unset, each point
//! costs one relaxed atomic load.
//!
//! Points: `log.before_sync` (records written, not yet durable), `store.mid_commit` (a
//! transaction half written), `store.after_commit` (committed, not yet published to queries),
//! `aggregator.after_checkpoint`, `checkpoint.before_sync` (a checkpoint file written, not yet
//! durable, while commits go on), `archive.after_begin` (an archive flush recorded, no file
//! written), `archive.mid_flush` (some of a flush's files written), `store.mid_replace` (a
//! recalculation's transaction half written), `pg.before_commit` (a scale-out partition commit
//! written, not committed), `pg.mid_replace` (a scaled-out recalculation's transaction written,
//! not committed). `aggregator.before_commit` pauses (SIGSTOP) a scale-out aggregator
//! holding a processed batch. And one that stalls instead of aborting: `aggregator.stall`
//! (the aggregator stops consuming, to test backpressure). And one that fails an operation:
//! `log.sync_fails` (an fsync of the click log returns an error, as a failing disk does).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// The point armed by `ADCLICK_FAULT` and the hit count it fires at.
fn armed_point() -> &'static Option<(String, u64)> {
    ARMED.get_or_init(|| {
        let v = std::env::var("ADCLICK_FAULT").ok()?;
        let (p, n) = v.rsplit_once(':')?;
        Some((p.to_owned(), n.parse().ok()?))
    })
}

/// This point is armed and reached for the n-th time or later.
fn armed(name: &str) -> bool {
    matches!(armed_point(), Some((p, n)) if p == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 >= *n)
}

/// Blocks this thread for good if this point is armed and its count is reached.
pub fn stall(name: &str) {
    if armed(name) {
        eprintln!("adclick: fault point {name} reached: stalling");
        loop {
            std::thread::park();
        }
    }
}

/// Stops the whole process (SIGSTOP) the n-th time this point is reached, once: a test resumes
/// it with SIGCONT, e.g. to turn an aggregator into a zombie at a chosen instant.
pub fn pause(name: &str) {
    if matches!(armed_point(), Some((p, n)) if p == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n)
    {
        eprintln!("adclick: fault point {name} reached: stopping (SIGSTOP)");
        // SAFETY: raise has no preconditions.
        unsafe {
            libc::raise(libc::SIGSTOP);
        }
    }
}

/// Whether the operation at this point should fail now (armed and its count reached).
pub fn fails(name: &str) -> bool {
    armed(name)
}

/// Aborts here if this point is armed and its count is reached.
pub fn point(name: &str) {
    if armed(name) {
        eprintln!("adclick: fault point {name} reached: aborting");
        std::process::abort();
    }
}

/// Stops the process after a failure that leaves only what is durable trustworthy (a failed
/// fsync, commit or read of the log): going on could acknowledge or publish what is not. A
/// restart recovers from disk, or, scaled out, resumes from what PostgreSQL holds. Exit code 70.
pub fn fatal(what: &str, err: impl std::fmt::Display) -> ! {
    tracing::error!("{what}: {err}; stopping so that a restart recovers from what is durable");
    eprintln!("adclick: fatal: {what}: {err}");
    std::process::exit(70)
}

/// An error and its causes, `outer: inner: …`, each cause once (a message that already quotes
/// its source is not repeated).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}
