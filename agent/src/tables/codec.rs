//! Records in sled are CBOR (minicbor), as on the wire; a record that does not decode is
//! reported with its table and key ([`TableError::Corrupt`]), never skipped or overwritten.

use super::TableError;
use minicbor::{Decode, Encode};

pub(crate) fn enc<T: Encode<()>>(v: &T) -> Vec<u8> {
    // Room for a contract record (about 400 bytes) from the start: growing the buffer from
    // empty took a fifth of a reservation's instructions (bench/callgrind.sh).
    let mut buf = Vec::with_capacity(512);
    // Encoding into a Vec cannot fail.
    let _ = minicbor::encode(v, &mut buf);
    buf
}

pub(crate) fn dec<T: for<'a> Decode<'a, ()>>(
    table: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, TableError> {
    minicbor::decode(bytes).map_err(|e| TableError::Corrupt {
        tree: table,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

/// One record of `tree` under `key`, decoded.
pub(crate) fn one<T: for<'a> Decode<'a, ()>>(
    table: &'static str,
    tree: &sled::Tree,
    key: &[u8],
) -> Result<Option<T>, TableError> {
    tree.get(key)?.map(|v| dec(table, key, &v)).transpose()
}

/// Every record of `tree` whose key starts with `prefix`, decoded, in key order.
pub(crate) fn scan<T: for<'a> Decode<'a, ()>>(
    table: &'static str,
    tree: &sled::Tree,
    prefix: &[u8],
) -> Result<Vec<T>, TableError> {
    tree.scan_prefix(prefix)
        .map(|kv| {
            let (k, v) = kv?;
            dec(table, &k, &v)
        })
        .collect()
}
