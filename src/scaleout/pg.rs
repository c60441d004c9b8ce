//! The PostgreSQL store of the scale-out deployment: per-(minute, ad, partition) counts, each
//! partition's final top-N lists, and per source partition its owner's epoch, next offset,
//! watermark and engine checkpoint files.
//!
//! One transaction per partition commit holds everything a batch changed: counts, tops, the
//! partition's next Kafka offset, its watermark, its new checkpoint file (and the deletion of
//! files its state no longer needs). It first locks the partition's row and checks the epoch
//! the committer was given when it claimed the partition: a claim by another process bumps it,
//! so a zombie's commit is refused and nothing stale is written (fencing).
//!
//! Results are keyed by source partition too: each partition's rows are written by its owner
//! alone, and queries sum over partitions (every click of an ad lands in one partition, so the
//! per-partition top-N lists merge into the exact global one).

use std::collections::HashSet;
use std::time::Duration;

use postgres::{Client, NoTls};

use crate::engine::{Extent, Output, PartitionId, Slot, Watermark};
use crate::event::{AdId, Minute};

/// How long a connection attempt may take before start-up gives up with an error.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Schema versions, applied in order at start (under an advisory lock, so concurrent starts
/// apply each once). Results are partitioned by day, created on first write. Version 2 adds
/// per-hour sums of sealed minutes (see [`Commit::roll`]), so that popular ads over many
/// minutes read hour rows, and minute rows only at either end and for the newest minutes.
/// Version 3 adds the raw archiver's offsets and flush in progress (see `scaleout::archive`).
/// Version 4 adds the clicks found too late, per minute, ad, slot and partition: reconciliation
/// explains differences with them, and `explain` which clicks a recalculation counted since
/// (`recounted`; see `scaleout::recalc`); where the archive role writes, so that a job reading
/// another archive is refused; and a counter a job bumps to have the archive role flush now.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE adclick_settings (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE adclick_partitions (
    partition int PRIMARY KEY,
    epoch bigint NOT NULL DEFAULT 0,
    owner text,
    next_offset bigint NOT NULL DEFAULT 0,
    watermark bigint NOT NULL DEFAULT -9223372036854775808,
    engine_watermark bigint NOT NULL DEFAULT -9223372036854775808,
    counted bigint NOT NULL DEFAULT 0,
    duplicates bigint NOT NULL DEFAULT 0,
    too_late bigint NOT NULL DEFAULT 0,
    invalid bigint NOT NULL DEFAULT 0,
    seq bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE adclick_checkpoints (
    partition int NOT NULL,
    seq bigint NOT NULL,
    max_time bigint,
    max_minute bigint,
    bytes bytea NOT NULL,
    PRIMARY KEY (partition, seq)
);
CREATE TABLE adclick_counts (
    minute bigint NOT NULL,
    slot smallint NOT NULL,
    ad_id text COLLATE "C" NOT NULL,
    partition int NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (minute, slot, ad_id, partition)
) PARTITION BY RANGE (minute);
CREATE INDEX adclick_counts_by_ad ON adclick_counts (ad_id, slot, minute);
CREATE TABLE adclick_tops (
    minute bigint NOT NULL,
    slot smallint NOT NULL,
    partition int NOT NULL,
    ad_ids text[] NOT NULL,
    counts bigint[] NOT NULL,
    PRIMARY KEY (minute, slot, partition)
) PARTITION BY RANGE (minute);
"#,
    r#"
CREATE TABLE adclick_hours (
    hour bigint NOT NULL,
    slot smallint NOT NULL,
    ad_id text COLLATE "C" NOT NULL,
    partition int NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (hour, slot, ad_id, partition)
) PARTITION BY RANGE (hour);
ALTER TABLE adclick_partitions ADD COLUMN rolled_through bigint NOT NULL DEFAULT -9223372036854775808;
"#,
    r#"
CREATE TABLE adclick_archive_offsets (partition int PRIMARY KEY, next_offset bigint NOT NULL);
CREATE TABLE adclick_archive (
    id int PRIMARY KEY CHECK (id = 1),
    next_seq bigint NOT NULL,
    pending_seq bigint,
    pending_parts int[],
    pending_from bigint[],
    pending_to bigint[]
);
INSERT INTO adclick_archive (id, next_seq) VALUES (1, 0);
"#,
    r#"
CREATE TABLE adclick_too_late (
    minute bigint NOT NULL,
    slot smallint NOT NULL,
    ad_id text COLLATE "C" NOT NULL,
    partition int NOT NULL,
    count bigint NOT NULL,
    recounted bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, slot, ad_id, partition)
);
ALTER TABLE adclick_archive ADD COLUMN location text,
    ADD COLUMN flush_requested bigint NOT NULL DEFAULT 0;
"#,
];

pub(super) const MINUTES_PER_DAY: i64 = 1440;
pub(super) const HOURS_PER_DAY: i64 = 24;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("PostgreSQL: {}", crate::scaleout::pg::describe(.0))]
    Db(#[from] postgres::Error),
    #[error("partition {0}: fenced off (another process claimed it; epoch {1} is stale)")]
    Fenced(u32, i64),
    #[error("{0}")]
    Refused(String),
    /// The server could not be reached (down, restarting, refusing connections).
    #[error("{0}")]
    Unreachable(String),
}

/// Connection failures (SQLSTATE classes 08, 57P: shutting down, starting up; 53300: too many
/// connections) and client-side I/O errors, not errors of the statement.
pub(super) fn transient(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }
        None => {
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                if c.is::<std::io::Error>() {
                    return true;
                }
                cause = c.source();
            }
            false
        }
    }
}

/// Connects with a bounded wait and an error that names the server.
pub fn connect(url: &str) -> Result<Client, PgError> {
    let mut config: postgres::Config = url.parse().map_err(|e| {
        PgError::Refused(format!("postgres: {:?} is not a connection URL ({e})", redact(url)))
    })?;
    config.connect_timeout(CONNECT_TIMEOUT);
    config.application_name("adclick");
    config.connect(NoTls).map_err(|e| {
        let msg = format!("postgres: cannot connect to {}: {}", redact(url), describe(&e));
        if transient(&e) {
            PgError::Unreachable(msg)
        } else {
            PgError::Refused(msg)
        }
    })
}

/// A PostgreSQL error with the server's message and code, or the client's cause.
pub fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Applies the embedded migrations that the database does not have yet.
pub fn migrate(client: &mut Client) -> Result<(), PgError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(7367281)", &[])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS adclick_schema (version int NOT NULL)")?;
    let version: i32 =
        tx.query_opt("SELECT version FROM adclick_schema", &[])?.map(|r| r.get(0)).unwrap_or(0);
    if version as usize > MIGRATIONS.len() {
        return Err(PgError::Refused(format!(
            "postgres: the schema is at version {version}, newer than this adclick knows ({}); \
             upgrade adclick",
            MIGRATIONS.len()
        )));
    }
    for sql in &MIGRATIONS[version as usize..] {
        tx.batch_execute(sql)?;
    }
    tx.execute("DELETE FROM adclick_schema", &[])?;
    tx.execute("INSERT INTO adclick_schema VALUES ($1)", &[&(MIGRATIONS.len() as i32)])?;
    tx.commit()?;
    Ok(())
}

/// Records `settings` on first start and refuses a start with other values (a changed partition
/// count would move ads between partitions; other filters or windows would mix counts).
pub fn check_settings(client: &mut Client, settings: &[(String, String)]) -> Result<(), PgError> {
    let mut tx = client.transaction()?;
    tx.execute("LOCK TABLE adclick_settings IN EXCLUSIVE MODE", &[])?;
    let rows = tx.query("SELECT key, value FROM adclick_settings", &[])?;
    if rows.is_empty() {
        for (k, v) in settings {
            tx.execute("INSERT INTO adclick_settings VALUES ($1, $2)", &[k, v])?;
        }
        tx.commit()?;
        return Ok(());
    }
    let recorded: std::collections::HashMap<String, String> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let changed: Vec<String> = settings
        .iter()
        .filter(|(k, v)| recorded.get(k) != Some(v))
        .map(|(k, v)| {
            format!(
                "{k}: the database holds results made with {}, this start has {v}",
                recorded.get(k).map_or("nothing", |s| s.as_str())
            )
        })
        .collect();
    if !changed.is_empty() {
        return Err(PgError::Refused(format!(
            "postgres: settings differ from those the results were made with (changing them \
             would mix counts); use the recorded values or a new database:\n  {}",
            changed.join("\n  ")
        )));
    }
    Ok(())
}

/// What a claim hands the new owner of a partition.
pub struct Claim {
    pub epoch: i64,
    /// The offset of the first record not yet reflected in the stored results.
    pub next_offset: i64,
    /// The checkpoint files its state restores from, oldest first.
    pub files: Vec<(u64, Extent, Vec<u8>)>,
    /// Minutes below this one are summed into the hour sums.
    pub rolled_through: i64,
}

/// Takes ownership of `p`: bumps its epoch (fencing off any previous owner; waits for a commit
/// of theirs in flight) and reads where to resume from.
pub fn claim(client: &mut Client, p: PartitionId, owner: &str) -> Result<Claim, PgError> {
    let part = p.0 as i32;
    let mut tx = client.transaction()?;
    tx.execute(
        "INSERT INTO adclick_partitions (partition) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&part],
    )?;
    let row = tx.query_one(
        "UPDATE adclick_partitions SET epoch = epoch + 1, owner = $2, updated_at = now() \
         WHERE partition = $1 RETURNING epoch, next_offset, rolled_through",
        &[&part, &owner],
    )?;
    let files = tx
        .query(
            "SELECT seq, max_time, max_minute, bytes FROM adclick_checkpoints \
             WHERE partition = $1 ORDER BY seq",
            &[&part],
        )?
        .into_iter()
        .map(|r| {
            let extent = Extent {
                max_time: r.get::<_, Option<i64>>(1),
                max_minute: r.get::<_, Option<i64>>(2).map(Minute),
            };
            (r.get::<_, i64>(0) as u64, extent, r.get::<_, Vec<u8>>(3))
        })
        .collect();
    tx.commit()?;
    Ok(Claim { epoch: row.get(0), next_offset: row.get(1), files, rolled_through: row.get(2) })
}

/// A partition's batch to commit.
pub struct Commit<'a> {
    pub partition: PartitionId,
    pub epoch: i64,
    pub next_offset: i64,
    pub output: &'a Output,
    pub checkpoint: (u64, Extent, &'a [u8]),
    /// Checkpoint files no longer needed.
    pub dropped: &'a [u64],
    /// Minutes `[from, to)` that the engine's watermark has sealed since the last commit (no
    /// click can change them any more): their counts are added to the hour sums, once.
    pub roll: Option<(i64, i64)>,
}

/// Writes rows through one partitioned table's daily partitions, creating those missing.
pub struct Days {
    created: HashSet<(&'static str, i64)>,
}

impl Days {
    pub fn new() -> Days {
        Days { created: HashSet::new() }
    }

    pub(super) fn ensure(
        &mut self,
        client: &mut Client,
        table: &'static str,
        per_day: i64,
        keys: impl Iterator<Item = i64>,
    ) -> Result<(), PgError> {
        let days: HashSet<i64> = keys.map(|k| k.div_euclid(per_day)).collect();
        for day in days {
            if self.created.contains(&(table, day)) {
                continue;
            }
            let name =
                if day < 0 { format!("{table}_dm{}", -day) } else { format!("{table}_d{day}") };
            let (lo, hi) = (day * per_day, (day + 1) * per_day);
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ({lo}) TO ({hi})"
            );
            if let Err(e) = client.batch_execute(&sql) {
                // Another process created it at the same moment.
                let raced = e.code().is_some_and(|c| {
                    *c == postgres::error::SqlState::DUPLICATE_TABLE
                        || *c == postgres::error::SqlState::UNIQUE_VIOLATION
                });
                if !raced {
                    return Err(e.into());
                }
            }
            self.created.insert((table, day));
        }
        Ok(())
    }
}

impl Default for Days {
    fn default() -> Self {
        Days::new()
    }
}

/// Where a partition's batch is committed: a connection as it is, or a [`Conn`] that waits
/// out an outage ([`super::conn::Conn`]: a commit that landed before the connection was cut is
/// not applied twice).
pub trait Committer {
    fn commit(&mut self, days: &mut Days, c: &Commit<'_>) -> Result<(), PgError>;
}

impl Committer for Client {
    fn commit(&mut self, days: &mut Days, c: &Commit<'_>) -> Result<(), PgError> {
        commit(self, days, c)
    }
}

/// Commits one partition's batch atomically, or refuses it when the epoch is stale.
pub fn commit(client: &mut Client, days: &mut Days, c: &Commit<'_>) -> Result<(), PgError> {
    let out = c.output;
    days.ensure(client, "adclick_counts", MINUTES_PER_DAY, out.counts.iter().map(|(m, _, _)| m.0))?;
    if let Some((from, to)) = c.roll {
        let rolled_days = rolled_days(client, from, to)?;
        days.ensure(
            client,
            "adclick_hours",
            HOURS_PER_DAY,
            rolled_days.map(|d| d * HOURS_PER_DAY),
        )?;
    }
    days.ensure(client, "adclick_tops", MINUTES_PER_DAY, out.top.iter().map(|t| t.minute.0))?;
    let part = c.partition.0 as i32;
    let mut tx = client.transaction()?;
    let row = tx.query_one(
        "SELECT epoch, seq FROM adclick_partitions WHERE partition = $1 FOR UPDATE",
        &[&part],
    )?;
    let (epoch, seq): (i64, i64) = (row.get(0), row.get(1));
    if epoch != c.epoch {
        return Err(PgError::Fenced(c.partition.0, c.epoch));
    }
    if seq >= c.checkpoint.0 as i64 {
        // A retry of a commit that landed before its connection was cut (hour sums add up).
        return Ok(());
    }
    let (mut minutes, mut slots, mut ads, mut counts) = (vec![], vec![], vec![], vec![]);
    for (minute, ad, row) in out.counts.iter() {
        for (slot, &n) in row.iter().enumerate() {
            if n > 0 {
                minutes.push(minute.0);
                slots.push(slot as i16);
                ads.push(ad.as_str());
                counts.push(n as i64);
            }
        }
    }
    if !minutes.is_empty() {
        tx.execute(
            "INSERT INTO adclick_counts (minute, slot, ad_id, partition, count) \
             SELECT m, s, a, $5, c FROM unnest($1::bigint[], $2::smallint[], $3::text[], $4::bigint[]) AS t(m, s, a, c) \
             ON CONFLICT (minute, slot, ad_id, partition) DO UPDATE SET count = EXCLUDED.count",
            &[&minutes, &slots, &ads, &counts, &part],
        )?;
    }
    if !out.too_late.is_empty() {
        let (mut minutes, mut slots, mut ads, mut counts) = (vec![], vec![], vec![], vec![]);
        for (minute, ad, row) in out.too_late.iter() {
            for (slot, &n) in row.iter().enumerate().filter(|(_, &n)| n > 0) {
                minutes.push(minute.0);
                slots.push(slot as i16);
                ads.push(ad.as_str());
                counts.push(n as i64);
            }
        }
        tx.execute(
            "INSERT INTO adclick_too_late AS l (minute, slot, ad_id, partition, count) \
             SELECT m, s, a, $5, c FROM unnest($1::bigint[], $2::smallint[], $3::text[], $4::bigint[]) AS t(m, s, a, c) \
             ON CONFLICT (minute, slot, ad_id, partition) DO UPDATE SET count = l.count + EXCLUDED.count",
            &[&minutes, &slots, &ads, &counts, &part],
        )?;
    }
    for t in &out.top {
        let ids: Vec<&str> = t.ads.iter().map(|r| r.0.as_str()).collect();
        let counts: Vec<i64> = t.ads.iter().map(|r| r.1 as i64).collect();
        tx.execute(
            "INSERT INTO adclick_tops (minute, slot, partition, ad_ids, counts) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (minute, slot, partition) DO UPDATE SET ad_ids = EXCLUDED.ad_ids, counts = EXCLUDED.counts",
            &[&t.minute.0, &(t.slot.index() as i16), &part, &ids, &counts],
        )?;
    }
    if let Some((from, to)) = c.roll {
        tx.execute(
            "INSERT INTO adclick_hours AS h (hour, slot, ad_id, partition, count) \
             SELECT floor(minute::numeric / 60)::bigint, slot, ad_id, partition, sum(count) \
             FROM adclick_counts WHERE partition = $1 AND minute >= $2 AND minute < $3 \
             GROUP BY 1, 2, 3, 4 \
             ON CONFLICT (hour, slot, ad_id, partition) DO UPDATE SET count = h.count + EXCLUDED.count",
            &[&part, &from, &to],
        )?;
        tx.execute(
            "UPDATE adclick_partitions SET rolled_through = $2 WHERE partition = $1",
            &[&part, &to],
        )?;
    }
    let (seq, extent, bytes) = c.checkpoint;
    tx.execute(
        "INSERT INTO adclick_checkpoints (partition, seq, max_time, max_minute, bytes) VALUES ($1, $2, $3, $4, $5)",
        &[&part, &(seq as i64), &extent.max_time, &extent.max_minute.map(|m| m.0), &bytes],
    )?;
    if !c.dropped.is_empty() {
        let dropped: Vec<i64> = c.dropped.iter().map(|&s| s as i64).collect();
        tx.execute(
            "DELETE FROM adclick_checkpoints WHERE partition = $1 AND seq = ANY($2)",
            &[&part, &dropped],
        )?;
    }
    let k = &out.counters;
    tx.execute(
        "UPDATE adclick_partitions SET next_offset = $2, watermark = GREATEST(watermark, $3), engine_watermark = $3, counted = $4, \
         duplicates = $5, too_late = $6, invalid = $7, seq = $8, updated_at = now() WHERE partition = $1",
        &[
            &part,
            &c.next_offset,
            &out.watermark.to_raw(),
            &(k.counted as i64),
            &(k.duplicate as i64),
            &(k.too_late as i64),
            &(k.invalid_total() as i64),
            &(seq as i64),
        ],
    )?;
    crate::fault::point("pg.before_commit");
    tx.commit()?;
    Ok(())
}

/// The days of minutes `[from, to)` that may hold counts: every day of the range when it is
/// short, else (a first roll, or a watermark that jumped) the days the counts table has a
/// partition for, this commit's included (created before the transaction).
fn rolled_days(
    client: &mut Client,
    from: i64,
    to: i64,
) -> Result<Box<dyn Iterator<Item = i64>>, PgError> {
    let (lo, hi) = (from.div_euclid(MINUTES_PER_DAY), (to - 1).div_euclid(MINUTES_PER_DAY));
    if to.saturating_sub(from) <= 2 * MINUTES_PER_DAY {
        return Ok(Box::new(lo..=hi));
    }
    let rows = client.query(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'adclick_counts'::regclass",
        &[],
    )?;
    let days: Vec<i64> = rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get(0);
            let day = name.strip_prefix("adclick_counts_")?;
            match day.strip_prefix("dm") {
                Some(neg) => neg.parse::<i64>().ok().map(|d| -d),
                None => day.strip_prefix('d')?.parse().ok(),
            }
        })
        .filter(|d| (lo..=hi).contains(d))
        .collect();
    Ok(Box::new(days.into_iter()))
}

/// Advances the stored watermark of a partition that has never delivered a valid click and has
/// been read to an end marker (and its offset past the marker), so that it does not hold every
/// minute back from final (the idle rule of SPEC §2 across partitions; see `aggregate`).
/// Refused like a commit when `epoch` is stale.
pub fn empty_watermark(
    client: &mut Client,
    p: PartitionId,
    epoch: i64,
    watermark: Watermark,
    next_offset: i64,
) -> Result<(), PgError> {
    let n = client.execute(
        "UPDATE adclick_partitions SET watermark = GREATEST(watermark, $3), \
         next_offset = GREATEST(next_offset, $4), updated_at = now() \
         WHERE partition = $1 AND epoch = $2",
        &[&(p.0 as i32), &epoch, &watermark.to_raw(), &next_offset],
    )?;
    if n == 0 {
        return Err(PgError::Fenced(p.0, epoch));
    }
    Ok(())
}

/// The watermarks of the whole topic: the lowest over its `partitions` (none until each has
/// committed once), so that `final` means final in every partition; and the lowest of the
/// engines' own, which only finalized minutes' top-N lists can be trusted up to (a partition
/// that never delivered a click has a stored watermark that follows the clock, and none in its
/// engine).
pub fn watermark(client: &mut Client, partitions: u32) -> Result<(Watermark, Watermark), PgError> {
    let row = client.query_one(
        "SELECT count(*), min(watermark), min(engine_watermark) FROM adclick_partitions \
         WHERE partition < $1",
        &[&(partitions as i32)],
    )?;
    let n: i64 = row.get(0);
    if n < i64::from(partitions) {
        return Ok((Watermark::NONE, Watermark::NONE));
    }
    let w = |i| Watermark::from_raw(row.get::<_, Option<i64>>(i).unwrap_or(i64::MIN));
    Ok((w(1), w(2)))
}

/// An ad's per-minute counts in `[from, to)`, summed over partitions, minutes with counts only.
pub fn series(
    client: &mut Client,
    ad: &str,
    slot: Slot,
    from: Minute,
    to: Minute,
) -> Result<Vec<(Minute, u64)>, PgError> {
    let rows = client.query(
        "SELECT minute, sum(count)::bigint FROM adclick_counts \
         WHERE ad_id = $1 AND slot = $2 AND minute >= $3 AND minute < $4 \
         GROUP BY minute ORDER BY minute",
        &[&ad, &(slot.index() as i16), &from.0, &to.0],
    )?;
    Ok(rows.iter().map(|r| (Minute(r.get(0)), r.get::<_, i64>(1) as u64)).collect())
}

/// Per minute of `[from, to)` with counts: the sum over every ad.
pub fn totals(
    client: &mut Client,
    slot: Slot,
    from: Minute,
    to: Minute,
) -> Result<Vec<(Minute, u64)>, PgError> {
    let rows = client.query(
        "SELECT minute, sum(count)::bigint FROM adclick_counts \
         WHERE slot = $1 AND minute >= $2 AND minute < $3 \
         GROUP BY minute HAVING sum(count) > 0 ORDER BY minute",
        &[&(slot.index() as i16), &from.0, &to.0],
    )?;
    Ok(rows.iter().map(|r| (Minute(r.get(0)), r.get::<_, i64>(1) as u64)).collect())
}

/// The `n` ads with the most clicks over `[from, to)`, ties by ad id in byte order.
///
/// One minute final in every partition's engine (`engines`), `n` within the stored lists: the
/// per-partition top-N lists merged (each ad lives in one partition, so the global top `n` is
/// among them). Otherwise the counts summed per ad over the range: whole hours from their sums.
pub fn popular(
    client: &mut Client,
    slot: Slot,
    from: Minute,
    to: Minute,
    n: usize,
    top_n: usize,
    engines: Watermark,
) -> Result<Vec<(AdId, u64)>, PgError> {
    let s = slot.index() as i16;
    if to.0 - from.0 == 1 && n <= top_n && engines.is_final(from) {
        let rows = client.query(
            "SELECT ad_ids, counts FROM adclick_tops WHERE minute = $1 AND slot = $2",
            &[&from.0, &s],
        )?;
        let mut all: Vec<crate::rank::Ranked> = Vec::new();
        for r in rows {
            let ids: Vec<String> = r.get(0);
            let counts: Vec<i64> = r.get(1);
            all.extend(ids.iter().zip(counts).map(|(a, c)| (AdId::new(a), c as u64)));
        }
        return Ok(crate::rank::top(all, n));
    }
    // Whole hours: their sums of sealed minutes, and the minutes not rolled into them yet; the
    // minutes either side from the counts. Only minutes at or past the lowest roll point of any
    // partition are read in the whole hours (the newest ones), so the cost follows the window's
    // hours, not its minutes.
    let (h_lo, h_hi) = ((from.0 + 59).div_euclid(60), to.0.div_euclid(60));
    let (whole, hours) =
        if h_lo < h_hi { ((h_lo * 60, h_hi * 60), (h_lo, h_hi)) } else { ((to.0, to.0), (0, 0)) };
    let rolled: i64 = client
        .query_one(
            "SELECT coalesce(min(rolled_through), -9223372036854775808) FROM adclick_partitions",
            &[],
        )?
        .get(0);
    let rows = client.query(
        "SELECT ad_id, sum(c)::bigint AS n FROM ( \
           SELECT c.ad_id, c.count AS c FROM adclick_counts c \
             LEFT JOIN adclick_partitions p ON p.partition = c.partition \
             WHERE c.slot = $1 AND ((c.minute >= $2 AND c.minute < $4) OR (c.minute >= $5 AND c.minute < $3) \
               OR (c.minute >= $4 AND c.minute < $5 AND c.minute >= $9 \
                   AND c.minute >= coalesce(p.rolled_through, -9223372036854775808))) \
           UNION ALL \
           SELECT ad_id, count FROM adclick_hours WHERE slot = $1 AND hour >= $6 AND hour < $7 \
         ) u GROUP BY ad_id ORDER BY n DESC, ad_id ASC LIMIT $8",
        &[&s, &from.0, &to.0, &whole.0, &whole.1, &hours.0, &hours.1, &(n as i64), &rolled],
    )?;
    Ok(rows.iter().map(|r| (AdId::new(r.get::<_, &str>(0)), r.get::<_, i64>(1) as u64)).collect())
}
