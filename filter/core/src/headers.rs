//! Reading the proxy-wasm serialized header map without copying and without trusting it.
//!
//! The SDK's own decoder turns every value into a `String` and panics on bytes
//! that are not UTF-8, which a client controls (e.g. in a Cookie header). The
//! glue therefore fetches the raw map once per request and reads it here:
//! `u32 count`, then `count` pairs of `u32 name_len, u32 value_len`, then each
//! name and value followed by a NUL byte (all little-endian).

/// A validated serialized header map, borrowed from the host's buffer.
#[derive(Debug, Clone, Copy)]
pub struct HeaderMap<'a> {
    bytes: &'a [u8],
    count: usize,
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    let arr: [u8; 4] = s.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(arr)).ok()
}

impl<'a> HeaderMap<'a> {
    /// Checks the whole layout once; `None` when any length runs past the end.
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        if bytes.is_empty() {
            return Some(HeaderMap { bytes, count: 0 });
        }
        let count = u32_at(bytes, 0)?;
        let mut data = count.checked_mul(8)?.checked_add(4)?;
        if data > bytes.len() {
            return None;
        }
        for i in 0..count {
            let n = u32_at(bytes, 4 + i * 8)?;
            let v = u32_at(bytes, 8 + i * 8)?;
            data = data
                .checked_add(n)?
                .checked_add(1)?
                .checked_add(v)?
                .checked_add(1)?;
            if data > bytes.len() {
                return None;
            }
        }
        Some(HeaderMap { bytes, count })
    }

    /// Every `(name, value)` pair in host order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone + 'a {
        let bytes = self.bytes;
        let mut data = 4 + self.count * 8;
        (0..self.count).map_while(move |i| {
            let n = u32_at(bytes, 4 + i * 8)?;
            let v = u32_at(bytes, 8 + i * 8)?;
            let name = bytes.get(data..data + n)?;
            data += n + 1;
            let value = bytes.get(data..data + v)?;
            data += v + 1;
            Some((name, value))
        })
    }

    /// Values of every header called `name` (ASCII case-insensitive).
    pub fn values<'n>(&self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The first value of `name`, if any.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.values(name).next()
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Whether a client-sent header must be removed: the route header and every
/// `x-prealloc-*`, compared after case-folding and `_` → `-`: CGI/WSGI-style
/// stacks (PEP 3333, Rack, PHP) fold the two together, so `x_prealloc_consumer`
/// reaches such a manager as `HTTP_X_PREALLOC_CONSUMER`, the real header's name.
pub fn is_reserved(name: &[u8], route_header: &str) -> bool {
    let prefix = prealloc_wire::RESERVED_HEADER_PREFIX.as_bytes();
    folded_eq(name, route_header.as_bytes())
        || name
            .get(..prefix.len())
            .is_some_and(|p| folded_eq(p, prefix))
}

/// Header names equal after ASCII case-folding and `_` → `-`.
fn folded_eq(a: &[u8], b: &[u8]) -> bool {
    let fold = |c: u8| match c {
        b'_' => b'-',
        c => c.to_ascii_lowercase(),
    };
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| fold(*x) == fold(*y))
}

/// Serializes pairs the way the host does (tests and the wasm host use the same layout).
pub fn serialize(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (n, v) in pairs {
        out.extend_from_slice(&(n.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (n, v) in pairs {
        out.extend_from_slice(n);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_lookup() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b":path", b"/x"),
            (b"cookie", b"a=1"),
            (b"Cookie", b"prealloc=\xff"),
            (b"empty", b""),
        ];
        let raw = serialize(&pairs);
        let m = HeaderMap::parse(&raw).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m.iter().collect::<Vec<_>>(), pairs);
        assert_eq!(
            m.values("cookie").collect::<Vec<_>>(),
            vec![&b"a=1"[..], &b"prealloc=\xff"[..]]
        );
        assert_eq!(m.get(":path"), Some(&b"/x"[..]));
        assert_eq!(m.get("empty"), Some(&b""[..]));
        assert_eq!(m.get("missing"), None);
        assert!(HeaderMap::parse(&[]).unwrap().is_empty());
    }

    #[test]
    fn truncated_or_lying_maps_are_refused() {
        let raw = serialize(&[(b"a", b"b")]);
        for cut in 1..raw.len() {
            assert!(HeaderMap::parse(&raw[..cut]).is_none(), "cut at {cut}");
        }
        assert!(HeaderMap::parse(&[0xff, 0xff, 0xff, 0xff]).is_none());
        let mut lie = raw.clone();
        lie[4] = 200;
        assert!(HeaderMap::parse(&lie).is_none());
    }

    #[test]
    fn reserved_headers() {
        for (name, want) in [
            (&b"x-prealloc-cluster"[..], true),
            (b"X-Prealloc-Consumer", true),
            (b"x-prealloc-", true),
            (b"x-route", true),
            (b"X-ROUTE", true),
            (b"x-preallocx", false),
            (b"cookie", false),
            (b"x-pre", false),
            // CGI/WSGI stacks fold '_' into '-': so does the filter.
            (b"x_prealloc_consumer", true),
            (b"X_PREALLOC-CLUSTER", true),
            (b"x_route", true),
            (b"x_preallocx", false),
        ] {
            assert_eq!(
                is_reserved(name, "x-route"),
                want,
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            if let Some(m) = HeaderMap::parse(&bytes) {
                prop_assert_eq!(m.iter().count(), m.len());
                let _ = m.get("cookie");
            }
        }

        #[test]
        fn serialized_maps_parse_back(pairs in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..10), proptest::collection::vec(any::<u8>(), 0..10)), 0..6)
        ) {
            let refs: Vec<(&[u8], &[u8])> = pairs.iter().map(|(n, v)| (n.as_slice(), v.as_slice())).collect();
            let raw = serialize(&refs);
            let m = HeaderMap::parse(&raw).unwrap();
            prop_assert_eq!(m.iter().collect::<Vec<_>>(), refs);
        }
    }
}
