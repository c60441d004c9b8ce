//! The byte codec of engine snapshots: little helpers for varints, strings and a checksummed,
//! versioned frame. The layout of each part is written next to the state it encodes
//! (`Mapper::encode`, `Shard::encode`); this module owns only the frame:
//!
//! ```text
//! magic "ADCLKSNP" | version u16 LE | body length u64 LE | body | xxh3-64 of body, LE
//! ```
//!
//! Integers in the body are LEB128 varints (signed ones zigzag-encoded), strings are a varint
//! length and the bytes. Any change to the body layout bumps [`VERSION`].

use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 8] = b"ADCLKSNP";
/// The body layout version written by this build.
pub const VERSION: u16 = 5;
/// The oldest body layout this build still reads (3: windows not length-prefixed; 3 and 4: dedup
/// entries in log order, not grouped by sub-table).
pub const OLDEST_READABLE: u16 = 3;

/// Why a snapshot cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not an adclick engine snapshot (bad magic)")]
    BadMagic,
    #[error(
        "snapshot format version {found} is not supported (this build reads {OLDEST_READABLE} to \
         {VERSION})"
    )]
    Version { found: u16 },
    #[error("snapshot is truncated or corrupt: {0}")]
    Corrupt(&'static str),
    #[error("snapshot checksum mismatch")]
    Checksum,
    #[error("snapshot was taken with {what} {found}, the engine is configured with {configured}")]
    Mismatch { what: &'static str, found: String, configured: String },
}

/// Appends encoded values to a buffer.
#[derive(Default)]
pub struct Encoder {
    pub buf: Vec<u8>,
}

impl Encoder {
    pub fn u(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }
    pub fn i(&mut self, v: i64) {
        self.u(((v << 1) ^ (v >> 63)) as u64);
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.u(b.len() as u64);
        self.buf.extend_from_slice(b);
    }
    pub fn u128(&mut self, v: u128) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bool(&mut self, v: bool) {
        self.buf.push(v as u8);
    }

    /// Wraps the body in the frame.
    pub fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len() + 26);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.buf.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.buf);
        out.extend_from_slice(&xxh3_64(&self.buf).to_le_bytes());
        out
    }
}

/// Reads values back; every read checks bounds.
pub struct Decoder<'a> {
    buf: &'a [u8],
    version: u16,
}

impl<'a> Decoder<'a> {
    /// A decoder over unframed bytes (values stored elsewhere with this encoding).
    pub fn raw(bytes: &'a [u8]) -> Decoder<'a> {
        Decoder { buf: bytes, version: VERSION }
    }

    /// Checks the frame and returns a decoder over the body.
    pub fn open(bytes: &'a [u8]) -> Result<Decoder<'a>, SnapshotError> {
        if bytes.len() < 18 || &bytes[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if !(OLDEST_READABLE..=VERSION).contains(&version) {
            return Err(SnapshotError::Version { found: version });
        }
        let len = u64::from_le_bytes(bytes[10..18].try_into().expect("8 bytes"));
        let body_end = 18usize
            .checked_add(usize::try_from(len).map_err(|_| SnapshotError::Corrupt("length"))?)
            .filter(|&end| end.checked_add(8) == Some(bytes.len()))
            .ok_or(SnapshotError::Corrupt("length"))?;
        let body = &bytes[18..body_end];
        let sum = u64::from_le_bytes(bytes[body_end..].try_into().expect("8 bytes"));
        if xxh3_64(body) != sum {
            return Err(SnapshotError::Checksum);
        }
        Ok(Decoder { buf: body, version })
    }

    /// The body layout version of the frame opened ([`VERSION`] for raw bytes).
    pub fn version(&self) -> u16 {
        self.version
    }

    pub fn u(&mut self) -> Result<u64, SnapshotError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first().ok_or(SnapshotError::Corrupt("varint"))?;
            self.buf = rest;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(SnapshotError::Corrupt("varint too long"))
    }
    pub fn i(&mut self) -> Result<i64, SnapshotError> {
        let v = self.u()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }
    /// A count of items that each take at least one byte, bounded by what is left.
    pub fn count(&mut self) -> Result<usize, SnapshotError> {
        let n = self.u()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.buf.len())
            .ok_or(SnapshotError::Corrupt("count"))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = self.count()?;
        let (b, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(b)
    }
    /// The next `n` bytes, stored without a length.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.buf.len() < n {
            return Err(SnapshotError::Corrupt("length"));
        }
        let (b, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(b)
    }
    pub fn str(&mut self) -> Result<&'a str, SnapshotError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| SnapshotError::Corrupt("utf-8"))
    }
    pub fn u128(&mut self) -> Result<u128, SnapshotError> {
        if self.buf.len() < 16 {
            return Err(SnapshotError::Corrupt("u128"));
        }
        let (b, rest) = self.buf.split_at(16);
        self.buf = rest;
        Ok(u128::from_le_bytes(b.try_into().expect("16 bytes")))
    }
    pub fn bool(&mut self) -> Result<bool, SnapshotError> {
        match self.u()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(SnapshotError::Corrupt("bool")),
        }
    }
    pub fn finish(self) -> Result<(), SnapshotError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::Corrupt("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut e = Encoder::default();
        for v in [0u64, 1, 127, 128, u64::MAX] {
            e.u(v);
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            e.i(v);
        }
        e.bytes(b"ad-1");
        e.u128(u128::MAX - 5);
        e.bool(true);
        let framed = e.finish();
        let mut d = Decoder::open(&framed).unwrap();
        for v in [0u64, 1, 127, 128, u64::MAX] {
            assert_eq!(d.u().unwrap(), v);
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(d.i().unwrap(), v);
        }
        assert_eq!(d.str().unwrap(), "ad-1");
        assert_eq!(d.u128().unwrap(), u128::MAX - 5);
        assert!(d.bool().unwrap());
        d.finish().unwrap();

        for cut in 0..framed.len() {
            assert!(Decoder::open(&framed[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..framed.len() {
            let mut bad = framed.clone();
            bad[i] ^= 0x10;
            assert!(Decoder::open(&bad).is_err(), "flip at {i}");
        }
    }
}
