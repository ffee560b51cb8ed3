//! Consumer ids that say where the consumer is stored, to no one else.
//!
//! An id is one AES-128 block: the resource id (8 bytes) and a random nonce
//! (8 bytes), encrypted with a key kept in the database. To anyone without
//! the key it is 128 opaque random-looking bits, as the design asks; to the
//! control plane, decrypting it gives the resource whose row holds the
//! consumer, so a consumer that is no longer in memory is found by primary
//! key, without an index on the id. A random index over millions of ids
//! doubled the cost of every sign-up's commit (BENCHMARKS.md, section 5).
//!
//! AES is a permutation: distinct (resource, nonce) pairs give distinct ids.
//! The row is always checked against the id, so an id minted before this
//! scheme (random bytes) decrypts to a row that does not match, and is
//! looked up in the table of such ids that the migration kept.

use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes128;
use prealloc_wire::ConsumerId;

/// The key of a database's consumer ids.
#[derive(Clone)]
pub struct IdKey(Aes128);

impl std::fmt::Debug for IdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never printed: with it, ids tell which resource they are on.
        f.write_str("IdKey(..)")
    }
}

impl IdKey {
    pub fn new(key: [u8; 16]) -> IdKey {
        IdKey(Aes128::new(&GenericArray::from(key)))
    }

    /// Parses the key as the database keeps it (32 hex digits).
    pub fn from_hex(hex: &str) -> Option<IdKey> {
        let hex = hex.as_bytes();
        if hex.len() != 32 {
            return None;
        }
        let mut key = [0u8; 16];
        for (k, pair) in key.iter_mut().zip(hex.chunks(2)) {
            let s = std::str::from_utf8(pair).ok()?;
            *k = u8::from_str_radix(s, 16).ok()?;
        }
        Some(IdKey::new(key))
    }

    /// A new key in the database's form.
    pub fn random_hex() -> String {
        let key: [u8; 16] = rand::random();
        key.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The id of a consumer on `resource`.
    pub fn mint(&self, resource: u64, nonce: u64) -> ConsumerId {
        let mut block = [0u8; 16];
        block[..8].copy_from_slice(&resource.to_be_bytes());
        block[8..].copy_from_slice(&nonce.to_be_bytes());
        let mut b = GenericArray::from(block);
        self.0.encrypt_block(&mut b);
        ConsumerId::from_bytes(b.into())
    }

    /// The resource an id was minted on (for an id minted otherwise, some
    /// number whose row will not match it).
    pub fn resource_of(&self, id: &ConsumerId) -> u64 {
        let mut b = GenericArray::from(id.to_bytes());
        self.0.decrypt_block(&mut b);
        let mut r = [0u8; 8];
        r.copy_from_slice(&b[..8]);
        u64::from_be_bytes(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn an_id_names_its_resource_and_ids_are_distinct(
            key: [u8; 16],
            a in (any::<u64>(), any::<u64>()),
            b in (any::<u64>(), any::<u64>()),
        ) {
            let k = IdKey::new(key);
            let (ia, ib) = (k.mint(a.0, a.1), k.mint(b.0, b.1));
            prop_assert_eq!(k.resource_of(&ia), a.0);
            prop_assert_eq!(k.resource_of(&ib), b.0);
            prop_assert_eq!(ia == ib, a == b);
        }
    }

    #[test]
    fn the_key_round_trips_through_hex_and_bad_hex_is_refused() {
        let hex = IdKey::random_hex();
        let k = IdKey::from_hex(&hex).expect("a fresh key parses");
        let again = IdKey::from_hex(&hex).expect("twice");
        assert_eq!(k.mint(7, 9), again.mint(7, 9));
        for bad in ["", "00", &"zz".repeat(16), &"0".repeat(33)] {
            assert!(IdKey::from_hex(bad).is_none(), "{bad:?}");
        }
        // Another key, another id for the same resource and nonce.
        let other = IdKey::new([1; 16]);
        assert_ne!(other.mint(7, 9), k.mint(7, 9));
    }
}
