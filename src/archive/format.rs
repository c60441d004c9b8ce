//! Archived clicks as Parquet: the schema of the module doc, a streaming file writer, and the
//! reader back into clicks.

use std::sync::Arc;

use arrow_array::builder::{
    StringBuilder, TimestampMillisecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{TimestampMillisecondType, UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::engine::{Offset, PartitionId};
use crate::event::{Click, Country, EventTime};
use std::net::IpAddr;

use super::ArchiveError;

/// The Parquet schema of archived clicks (see the module doc).
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("ad_id", DataType::Utf8, false),
        Field::new(
            "click_timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("user_id", DataType::Utf8, true),
        Field::new("ip", DataType::Utf8, true),
        Field::new("country", DataType::Utf8, true),
        Field::new("click_id", DataType::Utf8, true),
        Field::new("partition", DataType::UInt32, false),
        Field::new("offset", DataType::UInt64, false),
    ]))
}

/// One click with its place in the log, ready to archive.
pub struct Row<'a> {
    pub partition: PartitionId,
    pub offset: Offset,
    pub click: Click<'a>,
}

/// Rows appended to a file's columns before they become a record batch (and, every
/// [`ROW_GROUP`] rows, a compressed row group): memory stays bounded whatever a file holds.
pub(super) const BATCH_ROWS: usize = 1 << 16;

const ROW_GROUP: usize = 1 << 18;

/// One Parquet file being written in memory: column builders, then zstd row groups.
pub struct FileWriter {
    ad: StringBuilder,
    time: TimestampMillisecondBuilder,
    user: StringBuilder,
    ip: StringBuilder,
    country: StringBuilder,
    click_id: StringBuilder,
    partition: UInt32Builder,
    offset: UInt64Builder,
    rows: usize,
    ip_text: String,
    writer: parquet::arrow::ArrowWriter<Vec<u8>>,
}

impl FileWriter {
    pub fn new() -> Result<FileWriter, ArchiveError> {
        use parquet::schema::types::ColumnPath;
        let mut props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
            .set_max_row_group_row_count(Some(ROW_GROUP));
        // Columns of (nearly) unique values: a dictionary only costs hashing every value before
        // the writer falls back to plain pages. ad_id, country and partition keep theirs.
        for column in ["click_timestamp", "user_id", "ip", "click_id", "offset"] {
            props = props.set_column_dictionary_enabled(ColumnPath::from(column), false);
        }
        let props = props.build();
        Ok(FileWriter {
            ad: StringBuilder::new(),
            time: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            user: StringBuilder::new(),
            ip: StringBuilder::new(),
            country: StringBuilder::new(),
            click_id: StringBuilder::new(),
            partition: UInt32Builder::new(),
            offset: UInt64Builder::new(),
            rows: 0,
            ip_text: String::new(),
            writer: parquet::arrow::ArrowWriter::try_new(Vec::new(), schema(), Some(props))?,
        })
    }

    pub fn append(
        &mut self,
        partition: PartitionId,
        offset: Offset,
        c: &Click<'_>,
    ) -> Result<(), ArchiveError> {
        self.ad.append_value(&c.ad_id);
        self.time.append_value(c.time.0);
        self.user.append_option(c.user_id.as_deref());
        match c.ip {
            Some(a) => {
                ip_text(&mut self.ip_text, a);
                self.ip.append_value(&self.ip_text);
            }
            None => self.ip.append_null(),
        }
        self.country.append_option(c.country.as_ref().map(|c| c.as_str()));
        self.click_id.append_option(c.click_id.as_deref());
        self.partition.append_value(partition.0);
        self.offset.append_value(offset.0);
        self.rows += 1;
        if self.rows == BATCH_ROWS {
            self.write_batch()?;
        }
        Ok(())
    }

    fn write_batch(&mut self) -> Result<(), ArchiveError> {
        if self.rows == 0 {
            return Ok(());
        }
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(self.ad.finish()),
                Arc::new(self.time.finish()),
                Arc::new(self.user.finish()),
                Arc::new(self.ip.finish()),
                Arc::new(self.country.finish()),
                Arc::new(self.click_id.finish()),
                Arc::new(self.partition.finish()),
                Arc::new(self.offset.finish()),
            ],
        )?;
        self.writer.write(&batch)?;
        self.rows = 0;
        Ok(())
    }

    /// The whole file.
    pub fn finish(mut self) -> Result<Vec<u8>, ArchiveError> {
        self.write_batch()?;
        Ok(self.writer.into_inner()?)
    }
}

/// An address as `Display` writes it (canonical text), IPv4 without the formatting machinery.
fn ip_text(out: &mut String, ip: IpAddr) {
    out.clear();
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(_) => {
            use std::fmt::Write;
            let _ = write!(out, "{ip}");
        }
    }
}

/// Encodes rows (in the order given) as one Parquet file, zstd-compressed.
pub fn encode_parquet(rows: &[Row<'_>]) -> Result<Vec<u8>, ArchiveError> {
    let mut w = FileWriter::new()?;
    for r in rows {
        w.append(r.partition, r.offset, &r.click)?;
    }
    w.finish()
}

/// Decodes a Parquet file of archived clicks, checking its schema.
pub fn decode_parquet(bytes: bytes::Bytes) -> Result<Vec<RecordBatch>, ArchiveError> {
    use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
    use rayon::prelude::*;
    let meta = ArrowReaderMetadata::load(&bytes, Default::default())?;
    if meta.schema().fields() != schema().fields() {
        return Err(ArchiveError::Format(format!(
            "not an adclick archive file: its schema is {:?}",
            meta.schema()
        )));
    }
    // Row groups decode independently: in parallel, then in file order.
    let groups = (0..meta.metadata().num_row_groups())
        .into_par_iter()
        .map(|rg| {
            let reader =
                ParquetRecordBatchReaderBuilder::new_with_metadata(bytes.clone(), meta.clone())
                    .with_row_groups(vec![rg])
                    .with_batch_size(64 * 1024)
                    .build()?;
            reader.collect::<Result<Vec<_>, _>>().map_err(ArchiveError::from)
        })
        .collect::<Result<Vec<_>, ArchiveError>>()?;
    Ok(groups.into_iter().flatten().collect())
}

/// The clicks of a decoded batch, borrowing its strings: (partition, offset, click). A row
/// that does not hold a valid click (a file edited by hand) is an error naming the row.
pub fn clicks(b: &RecordBatch) -> Result<Vec<(PartitionId, Offset, Click<'_>)>, ArchiveError> {
    let mut out = Vec::with_capacity(b.num_rows());
    decode_rows(b, |_, _| true, &mut out)?;
    Ok(out)
}

/// The clicks of a decoded batch whose `ad_id` and event time (ms) `keep` accepts; only those
/// rows are decoded further.
pub fn clicks_where(
    b: &RecordBatch,
    keep: impl Fn(&str, i64) -> bool,
) -> Result<Vec<(PartitionId, Offset, Click<'_>)>, ArchiveError> {
    let mut out = Vec::new();
    decode_rows(b, keep, &mut out)?;
    Ok(out)
}

fn decode_rows<'b>(
    b: &'b RecordBatch,
    keep: impl Fn(&str, i64) -> bool,
    out: &mut Vec<(PartitionId, Offset, Click<'b>)>,
) -> Result<(), ArchiveError> {
    let ad = b.column(0).as_string::<i32>();
    let time = b.column(1).as_primitive::<TimestampMillisecondType>();
    let user = b.column(2).as_string::<i32>();
    let ip = b.column(3).as_string::<i32>();
    let country = b.column(4).as_string::<i32>();
    let click_id = b.column(5).as_string::<i32>();
    let partition = b.column(6).as_primitive::<UInt32Type>();
    let offset = b.column(7).as_primitive::<UInt64Type>();
    fn opt(a: &arrow_array::StringArray, i: usize) -> Option<&str> {
        (!a.is_null(i)).then(|| a.value(i))
    }
    for i in 0..b.num_rows() {
        if !keep(ad.value(i), time.value(i)) {
            continue;
        }
        let bad = |what: &str| {
            ArchiveError::Format(format!(
                "row of partition {} offset {}: {what}",
                partition.value(i),
                offset.value(i)
            ))
        };
        let ip = match opt(ip, i) {
            Some(s) => Some(s.parse::<IpAddr>().map_err(|_| bad("ip is not an address"))?),
            None => None,
        };
        let country = match opt(country, i) {
            Some(s) => Some(Country::parse(s).ok_or_else(|| bad("country is not assigned"))?),
            None => None,
        };
        out.push((
            PartitionId(partition.value(i)),
            Offset(offset.value(i)),
            Click {
                ad_id: ad.value(i).into(),
                time: EventTime(time.value(i)),
                user_id: opt(user, i).map(Into::into),
                ip,
                country,
                click_id: opt(click_id, i).map(Into::into),
            },
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_text_writes_what_display_writes() {
        let mut out = String::new();
        for a in [0u32, 1, 9, 10, 99, 100, 199, 200, 255, 256, 0x0a00_0001, 0xcb00_71c8, u32::MAX] {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(a));
            ip_text(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        ip_text(&mut out, v6);
        assert_eq!(out, "2001:db8::1");
    }
}
