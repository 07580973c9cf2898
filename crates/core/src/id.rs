//! Content identifiers: BLAKE3 digests of chunks and of whole files.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length in bytes of every Ferry digest (BLAKE3's default output).
pub const DIGEST_BYTES: usize = 32;

macro_rules! digest_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; DIGEST_BYTES]);

        /// Hex in human-readable formats (JSON), 32 raw bytes otherwise.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_hex())
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; DIGEST_BYTES]>::deserialize(d).map(Self)
                }
            }
        }

        impl $name {
            /// Hashes `data` with BLAKE3.
            pub fn of(data: &[u8]) -> Self {
                Self(*blake3::hash(data).as_bytes())
            }

            /// The raw digest bytes.
            pub fn as_bytes(&self) -> &[u8; DIGEST_BYTES] {
                &self.0
            }

            /// Reads a digest from exactly 32 bytes, as stored in keys.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; DIGEST_BYTES]>::try_from(bytes).ok().map(Self)
            }

            /// Lower-case hex, the form shown to operators.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The first 12 hex digits, enough to tell digests apart in a table.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..6])
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> Self {
                Self(*h.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = hex::FromHexError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; DIGEST_BYTES];
                hex::decode_to_slice(s, &mut out)?;
                Ok(Self(out))
            }
        }
    };
}

digest_type!(
    /// BLAKE3 digest of one chunk's bytes; the chunk's key in every library.
    ChunkId
);
digest_type!(
    /// BLAKE3 digest of a whole file, as `b3sum` prints it.
    FileHash
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_matches_blake3() {
        let id = ChunkId::of(b"ferry");
        assert_eq!(id.to_hex(), blake3::hash(b"ferry").to_hex().as_str());
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert_eq!(id.short().len(), 12);
        assert!("zz".parse::<ChunkId>().is_err());
        assert!(ChunkId::from_slice(&[0u8; 31]).is_none());
    }

    #[test]
    fn serde_is_hex_in_json_and_raw_in_postcard() {
        let id = FileHash::of(b"x");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", id.to_hex()));
        assert_eq!(serde_json::from_str::<FileHash>(&json).unwrap(), id);
        let bin = postcard::to_stdvec(&id).unwrap();
        assert_eq!(bin.len(), 32);
        assert_eq!(postcard::from_bytes::<FileHash>(&bin).unwrap(), id);
        assert!(serde_json::from_str::<FileHash>("\"nothex\"").is_err());
    }
}
