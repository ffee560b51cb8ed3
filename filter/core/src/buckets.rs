//! The wasm build's routing table in proxy-wasm shared data: consumers
//! grouped into buckets, one shared-data key per bucket.
//!
//! Envoy keeps a VM id's shared data in one hash map, which rehashes every
//! key in one go when it grows. With a key per consumer, loading a 1M table
//! stalled Envoy's main thread for about 150 ms at about 917k keys, and each
//! key cost about 200 bytes (BENCHMARKS.md, section 8). Buckets by the id's
//! first 16 bits bound the map at [`BUCKETS`] keys whatever the table's size
//! (about 15 consumers per bucket at 1M; the control plane mints ids as
//! ciphertext, so they spread evenly).
//!
//! Format (ARCHITECTURE.md): key `prealloc.b.<4 lowercase hex digits>` (the
//! id's first two bytes); value: one line per consumer, sorted by id,
//! `<consumer id> <entry>\n`, `<entry>` as in [`crate::table::decode_entry`]
//! (`1|r|manager_a,manager_b`). An empty value, or no key, is an empty bucket.
//!
//! One writer, the poller: a [`BucketWriter`] loads a bucket once, applies to
//! it every write that comes in a row for it, and stores it whole, so a
//! reader sees each bucket before or after a store, every entry whole.

use std::cmp::Ordering;
use std::ops::Range;

use prealloc_wire::{ConsumerId, CONSUMER_ID_LEN};

use crate::table::{decode_entry, encode_entry, encode_managers, TableError, TableWrite};
use crate::table::{OwnedEntry, MANAGERS_KEY};

/// Number of buckets: one per value of an id's first two bytes.
pub const BUCKETS: usize = 1 << 16;
/// Prefix of a bucket's shared-data key.
pub const BUCKET_KEY_PREFIX: &str = "prealloc.b.";

/// The bucket of a consumer: the first two bytes of its id, read from the
/// first three characters of its base64url form (on every table lookup).
pub fn bucket_of(id: &ConsumerId) -> u16 {
    let sextet = |i: usize| -> u16 {
        let v = match id.as_str().as_bytes().get(i).copied().unwrap_or(b'A') {
            c @ b'A'..=b'Z' => c - b'A',
            c @ b'a'..=b'z' => c - b'a' + 26,
            c @ b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            _ => 63,
        };
        u16::from(v)
    };
    (sextet(0) << 10) | (sextet(1) << 4) | (sextet(2) >> 2)
}

/// Shared-data key of a bucket.
pub fn bucket_key(bucket: u16) -> String {
    let mut k = String::with_capacity(BUCKET_KEY_PREFIX.len() + 4);
    k.push_str(BUCKET_KEY_PREFIX);
    for shift in [12, 8, 4, 0] {
        k.push(char::from_digit(u32::from((bucket >> shift) & 0xf), 16).unwrap_or('0'));
    }
    k
}

/// Shared-data key of the bucket that holds `id`'s entry.
pub fn consumer_bucket_key(id: &ConsumerId) -> String {
    bucket_key(bucket_of(id))
}

/// One line of a bucket value: the id's bytes and the entry's byte range.
struct Line<'a> {
    id: &'a [u8],
    entry: Range<usize>,
}

/// The lines of a bucket value, each checked for shape only (id, space,
/// something); the entry itself is decoded by whoever needs it. A line out of
/// shape is an error and the next line is read after it; a value that does
/// not end in a newline ends in an error.
struct Lines<'a> {
    value: &'a [u8],
    at: usize,
}

fn lines(value: &[u8]) -> Lines<'_> {
    Lines { value, at: 0 }
}

impl<'a> Iterator for Lines<'a> {
    type Item = Result<Line<'a>, TableError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.value.get(self.at..).filter(|r| !r.is_empty())?;
        let start = self.at;
        let Some(len) = rest.iter().position(|&c| c == b'\n') else {
            self.at = self.value.len();
            return Some(Err(TableError::Shape));
        };
        self.at += len + 1;
        let line = rest.get(..len)?;
        match (line.get(..CONSUMER_ID_LEN), line.get(CONSUMER_ID_LEN..)) {
            (Some(id), Some([b' ', _, ..])) => Some(Ok(Line {
                id,
                entry: start + CONSUMER_ID_LEN + 1..start + len,
            })),
            _ => Some(Err(TableError::Shape)),
        }
    }
}

/// Finds `id`'s line in a bucket value: the byte range of its entry (not
/// empty, not decoded yet), `Ok(None)` if the bucket does not hold it. Lines
/// are sorted, so the search stops at the first id past `id`; a line before
/// it that is out of shape is an error.
fn find(value: &[u8], id: &ConsumerId) -> Result<Option<Range<usize>>, TableError> {
    let want = id.as_str().as_bytes();
    for line in lines(value) {
        let line = line?;
        match line.id.cmp(want) {
            Ordering::Less => continue,
            Ordering::Greater => return Ok(None),
            Ordering::Equal => return Ok(Some(line.entry)),
        }
    }
    Ok(None)
}

/// `id`'s entry read out of a bucket value (what a shared-data read returns),
/// decoded and checked once.
pub fn owned_entry(value: Vec<u8>, id: &ConsumerId) -> Result<Option<OwnedEntry>, TableError> {
    match find(&value, id)? {
        Some(range) => OwnedEntry::decode_range(value, range),
        None => Ok(None),
    }
}

/// The shared data a [`BucketWriter`] reads and writes: the proxy-wasm host,
/// or a map in tests.
pub trait SharedData {
    /// The value under `key`, if any.
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    /// Stores `value` under `key`; whether the host took it.
    fn set(&mut self, key: &str, value: &[u8]) -> bool;
}

/// A bucket being written: its lines, sorted by id.
#[derive(Debug)]
struct Open {
    bucket: u16,
    lines: Vec<([u8; CONSUMER_ID_LEN], String)>,
    changed: usize,
}

/// Applies the poller's writes to bucketed shared data: the writes to one
/// bucket that come in a row cost one read and one store of it. Call
/// [`BucketWriter::flush`] at the end of every turn of writes, so that what
/// was written is visible before the turn ends.
#[derive(Debug, Default)]
pub struct BucketWriter {
    open: Option<Open>,
    /// Entry writes lost because the host refused a store, since the last
    /// [`BucketWriter::take_failed`].
    failed: usize,
    /// Lines of loaded buckets that were out of shape and dropped.
    dropped: usize,
}

impl BucketWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one write. Entry writes are buffered in their bucket (true);
    /// the managers are stored at once, after the open bucket (whether the
    /// host took them).
    pub fn write(&mut self, store: &mut impl SharedData, w: TableWrite<'_>) -> bool {
        match w {
            TableWrite::Managers(m) => {
                self.flush(store);
                store.set(MANAGERS_KEY, encode_managers(m.iter().copied()).as_bytes())
            }
            TableWrite::Entry {
                consumer,
                state,
                replicas,
            } => {
                let entry = encode_entry(state, replicas.iter().copied());
                self.put(store, consumer, Some(entry));
                true
            }
            TableWrite::Remove(consumer) => {
                self.put(store, consumer, None);
                true
            }
        }
    }

    fn put(&mut self, store: &mut impl SharedData, id: &ConsumerId, entry: Option<String>) {
        let Ok(key) = <[u8; CONSUMER_ID_LEN]>::try_from(id.as_str().as_bytes()) else {
            return; // a ConsumerId is always CONSUMER_ID_LEN bytes
        };
        let bucket = bucket_of(id);
        if self.open.as_ref().is_some_and(|o| o.bucket != bucket) {
            self.flush(store);
        }
        let open = match &mut self.open {
            Some(open) => open,
            None => {
                let loaded = self.load(store, bucket);
                self.open.insert(loaded)
            }
        };
        match (open.lines.binary_search_by(|(k, _)| k.cmp(&key)), entry) {
            (Ok(i), Some(e)) => {
                if let Some(line) = open.lines.get_mut(i) {
                    line.1 = e;
                }
            }
            (Err(i), Some(e)) => open.lines.insert(i, (key, e)),
            (Ok(i), None) => {
                open.lines.remove(i);
            }
            (Err(_), None) => return,
        }
        open.changed += 1;
    }

    fn load(&mut self, store: &impl SharedData, bucket: u16) -> Open {
        let value = store.get(&bucket_key(bucket)).unwrap_or_default();
        let mut lines = Vec::new();
        for line in lines_of(&value) {
            match line {
                Some(l) => lines.push(l),
                None => self.dropped += 1,
            }
        }
        lines.sort_by_key(|l| l.0);
        lines.dedup_by(|a, b| a.0 == b.0);
        Open {
            bucket,
            lines,
            changed: 0,
        }
    }

    /// Stores the open bucket, if it changed; whether the host took it.
    pub fn flush(&mut self, store: &mut impl SharedData) -> bool {
        let Some(open) = self.open.take() else {
            return true;
        };
        if open.changed == 0 {
            return true;
        }
        let len = open
            .lines
            .iter()
            .map(|(_, e)| CONSUMER_ID_LEN + e.len() + 2)
            .sum();
        let mut value = Vec::with_capacity(len);
        for (id, entry) in &open.lines {
            value.extend_from_slice(id);
            value.push(b' ');
            value.extend_from_slice(entry.as_bytes());
            value.push(b'\n');
        }
        let ok = store.set(&bucket_key(open.bucket), &value);
        if !ok {
            self.failed += open.changed;
        }
        ok
    }

    /// Entry writes lost to refused stores since the last call.
    pub fn take_failed(&mut self) -> usize {
        std::mem::take(&mut self.failed)
    }

    /// Lines of stored buckets found out of shape and dropped, so far.
    pub fn dropped(&self) -> usize {
        self.dropped
    }
}

/// The lines of a stored bucket as (id, entry); `None` for a line out of
/// shape or with an entry that does not decode.
fn lines_of(value: &[u8]) -> Vec<Option<([u8; CONSUMER_ID_LEN], String)>> {
    lines(value)
        .map(|line| {
            let l = line.ok()?;
            let id = <[u8; CONSUMER_ID_LEN]>::try_from(l.id).ok()?;
            ConsumerId::parse(std::str::from_utf8(&id).ok()?).ok()?;
            let entry = value.get(l.entry)?;
            decode_entry(entry).ok()??;
            Some((id, String::from_utf8(entry.to_vec()).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prealloc_wire::ConsumerState::{self, Registered as R, Registering as G};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Default)]
    struct Map {
        data: HashMap<String, Vec<u8>>,
        refuse: bool,
        sets: usize,
    }

    impl SharedData for Map {
        fn get(&self, key: &str) -> Option<Vec<u8>> {
            self.data.get(key).cloned()
        }
        fn set(&mut self, key: &str, value: &[u8]) -> bool {
            self.sets += 1;
            if self.refuse {
                return false;
            }
            self.data.insert(key.to_owned(), value.to_vec());
            true
        }
    }

    fn id(first: u8, rest: u8) -> ConsumerId {
        let mut b = [rest; 16];
        b[0] = first;
        b[1] = 0;
        ConsumerId::from_bytes(b)
    }

    fn lookup(m: &Map, c: &ConsumerId) -> Option<(ConsumerState, Vec<String>)> {
        let value = m.get(&consumer_bucket_key(c))?;
        let e = owned_entry(value, c).unwrap()?;
        let d = e.entry().unwrap();
        Some((d.state, d.replicas().map(str::to_owned).collect()))
    }

    #[test]
    fn keys_name_the_ids_first_two_bytes() {
        let mut b = [0u8; 16];
        b[0] = 0xab;
        b[1] = 0x05;
        assert_eq!(
            consumer_bucket_key(&ConsumerId::from_bytes(b)),
            "prealloc.b.ab05"
        );
        assert_eq!(bucket_key(0), "prealloc.b.0000");
    }

    #[test]
    fn a_bucket_holds_sorted_lines_and_a_run_of_writes_is_one_store() {
        let mut m = Map::default();
        let mut w = BucketWriter::new();
        let (a, b, c) = (id(1, 9), id(1, 3), id(1, 200));
        for (who, state, reps) in [
            (&a, R, &["m1", "m2"][..]),
            (&b, G, &["m1"][..]),
            (&c, G, &["m2"][..]),
        ] {
            assert!(w.write(
                &mut m,
                TableWrite::Entry {
                    consumer: who,
                    state,
                    replicas: reps
                }
            ));
        }
        assert_eq!(m.sets, 0, "buffered until the flush");
        assert!(w.flush(&mut m));
        assert_eq!(m.sets, 1);
        let value = String::from_utf8(m.get(&consumer_bucket_key(&a)).unwrap()).unwrap();
        let mut ids = [&a, &b, &c].map(|c| c.as_str().to_owned());
        ids.sort();
        let got: Vec<&str> = value.lines().map(|l| &l[..CONSUMER_ID_LEN]).collect();
        assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(value.contains(&format!("{a} 1|r|m1,m2\n")));
        assert_eq!(lookup(&m, &b), Some((G, vec!["m1".into()])));
        assert_eq!(lookup(&m, &id(1, 4)), None);
        // A removal rewrites the bucket without the line.
        w.write(&mut m, TableWrite::Remove(&b));
        w.flush(&mut m);
        assert_eq!(lookup(&m, &b), None);
        assert_eq!(lookup(&m, &a), Some((R, vec!["m1".into(), "m2".into()])));
        // Flushing an unchanged bucket stores nothing.
        let sets = m.sets;
        w.write(&mut m, TableWrite::Remove(&id(1, 4)));
        w.flush(&mut m);
        assert_eq!(m.sets, sets);
    }

    #[test]
    fn managers_are_stored_after_the_open_bucket() {
        let mut m = Map::default();
        let mut w = BucketWriter::new();
        let a = id(7, 7);
        w.write(
            &mut m,
            TableWrite::Entry {
                consumer: &a,
                state: G,
                replicas: &["m1"],
            },
        );
        let managers = [("m1", prealloc_wire::Availability::Available)];
        assert!(w.write(&mut m, TableWrite::Managers(&managers)));
        assert_eq!(m.sets, 2);
        assert_eq!(lookup(&m, &a), Some((G, vec!["m1".into()])));
        assert_eq!(m.get(MANAGERS_KEY).unwrap(), b"m1 available");
    }

    #[test]
    fn a_refused_store_is_counted_per_entry() {
        let mut m = Map {
            refuse: true,
            ..Map::default()
        };
        let mut w = BucketWriter::new();
        for n in [1, 2] {
            w.write(
                &mut m,
                TableWrite::Entry {
                    consumer: &id(3, n),
                    state: G,
                    replicas: &["m1"],
                },
            );
        }
        assert!(!w.flush(&mut m));
        assert_eq!(w.take_failed(), 2);
        assert_eq!(w.take_failed(), 0);
    }

    #[test]
    fn values_out_of_shape_are_refused_by_the_reader_and_dropped_by_the_writer() {
        let a = id(5, 1);
        let good = format!("{a} 1|g|m1\n");
        assert!(owned_entry(good.clone().into_bytes(), &a)
            .unwrap()
            .is_some());
        for bad in [
            format!("{a} 1|g|m1"),           // no final newline
            format!("{a}1|g|m1\n"),          // no space
            format!("{a} \n"),               // no entry
            format!("{a} 1|x|m1\n"),         // bad state
            format!("short 1|g|m1\n{good}"), // a bad line before it
        ] {
            assert!(
                owned_entry(bad.clone().into_bytes(), &a).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(owned_entry(Vec::new(), &a), Ok(None));
        let mut m = Map::default();
        let other = id(5, 2);
        m.set(&consumer_bucket_key(&a), format!("junk\n{good}").as_bytes());
        let mut w = BucketWriter::new();
        w.write(
            &mut m,
            TableWrite::Entry {
                consumer: &other,
                state: R,
                replicas: &["m2"],
            },
        );
        w.flush(&mut m);
        assert_eq!(w.dropped(), 1);
        assert_eq!(lookup(&m, &a), Some((G, vec!["m1".into()])));
        assert_eq!(lookup(&m, &other), Some((R, vec!["m2".into()])));
    }

    proptest! {
        #[test]
        fn the_bucket_is_the_ids_first_two_bytes(bytes in any::<[u8; 16]>()) {
            let c = ConsumerId::from_bytes(bytes);
            prop_assert_eq!(bucket_of(&c), u16::from_be_bytes([bytes[0], bytes[1]]));
            prop_assert_eq!(bucket_key(bucket_of(&c)), format!("prealloc.b.{:02x}{:02x}", bytes[0], bytes[1]));
        }

        #[test]
        fn the_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), n in any::<u8>()) {
            let _ = find(&bytes, &id(0, n));
            let _ = lines_of(&bytes);
        }

        /// Any sequence of writes, flushed at random points, leaves the
        /// buckets holding exactly what a map of the writes holds.
        #[test]
        fn buckets_hold_what_was_written(
            ops in proptest::collection::vec((0u8..3, any::<u8>(), 0u8..3, any::<bool>()), 1..120),
        ) {
            let mut m = Map::default();
            let mut w = BucketWriter::new();
            let mut model: BTreeMap<String, (ConsumerState, Vec<String>)> = BTreeMap::new();
            let clusters = ["m1", "m2", "m3"];
            for (first, rest, op, flush) in ops {
                let c = id(first, rest);
                if op == 0 {
                    w.write(&mut m, TableWrite::Remove(&c));
                    model.remove(c.as_str());
                } else {
                    let n = usize::from(op);
                    let state = if op == 1 { G } else { R };
                    w.write(&mut m, TableWrite::Entry { consumer: &c, state, replicas: &clusters[..n] });
                    model.insert(c.as_str().to_owned(), (state, clusters[..n].iter().map(|s| s.to_string()).collect()));
                }
                if flush {
                    w.flush(&mut m);
                }
            }
            w.flush(&mut m);
            for first in 0u8..3 {
                for rest in 0u8..=255 {
                    let c = id(first, rest);
                    prop_assert_eq!(lookup(&m, &c), model.get(c.as_str()).cloned());
                }
            }
            prop_assert_eq!(w.dropped(), 0);
        }
    }
}
