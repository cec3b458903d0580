//! Encodings of an item inside Redis.
//!
//! An item is split in two so that the Lua scripts never copy a payload they do not
//! need:
//! - the **body** (`items` hash): what only Rust reads: routing key, handler, merge
//!   key and payload, in a small length-prefixed binary format (version byte first);
//! - the **meta** (`meta` hash): what the scripts read and rewrite on every pop and
//!   settle, as text `due|max_attempts|attempts|nonce_hex|merge_class`.
//!
//! The merge class is `handler \x01 key \x01 merge_key` (empty when the item has no
//! merge key). Control characters are refused in every one of those fields, so `\x01`
//! cannot occur inside them and the class is unambiguous.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::queue::Item;

const BODY_VERSION: u8 = 1;

/// The separator inside a merge class.
pub const MERGE_SEP: char = '\u{1}';

/// Body fields of an item, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    /// Routing key.
    pub key: String,
    /// Handler name.
    pub handler: String,
    /// Merge key.
    pub merge_key: Option<String>,
    /// Payload.
    pub payload: Bytes,
}

/// Encodes a body: version byte, then four `u32 LE length + bytes` fields.
pub fn encode_body(key: &str, handler: &str, merge_key: Option<&str>, payload: &[u8]) -> Vec<u8> {
    let mk = merge_key.unwrap_or("");
    let mut out = Vec::with_capacity(1 + 16 + key.len() + handler.len() + mk.len() + payload.len());
    out.push(BODY_VERSION);
    for field in [key.as_bytes(), handler.as_bytes(), mk.as_bytes(), payload] {
        out.extend_from_slice(&(field.len() as u32).to_le_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// Decodes a body written by [`encode_body`].
pub fn decode_body(raw: &[u8]) -> Result<Body> {
    let corrupt = |why: &str| Error::Corrupt(format!("item body: {why}"));
    let (&version, mut rest) = raw.split_first().ok_or_else(|| corrupt("empty"))?;
    if version != BODY_VERSION {
        return Err(corrupt(&format!("unknown version {version}")));
    }
    let mut fields: [&[u8]; 4] = [&[]; 4];
    for f in fields.iter_mut() {
        if rest.len() < 4 {
            return Err(corrupt("truncated length"));
        }
        let (len, tail) = rest.split_at(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if tail.len() < len {
            return Err(corrupt("truncated field"));
        }
        let (value, tail) = tail.split_at(len);
        *f = value;
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    let text = |b: &[u8]| {
        String::from_utf8(b.to_vec()).map_err(|_| corrupt("field is not UTF-8"))
    };
    let mk = text(fields[2])?;
    Ok(Body {
        key: text(fields[0])?,
        handler: text(fields[1])?,
        merge_key: (!mk.is_empty()).then_some(mk),
        payload: Bytes::copy_from_slice(fields[3]),
    })
}

/// The merge class of an item: who it may be merged with. Empty without merge key.
pub fn merge_class(handler: &str, key: &str, merge_key: Option<&str>) -> String {
    match merge_key {
        Some(mk) => format!("{handler}{MERGE_SEP}{key}{MERGE_SEP}{mk}"),
        None => String::new(),
    }
}

/// Meta fields of an item, as the scripts keep them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Scheduled due time.
    pub due_at_ms: i64,
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// Deliveries so far.
    pub attempts: u32,
    /// The item's nonce.
    pub nonce: u64,
}

/// Formats meta as the scripts expect it.
pub fn encode_meta(m: &Meta, merge_class: &str) -> String {
    format!(
        "{}|{}|{}|{:016x}|{}",
        m.due_at_ms, m.max_attempts, m.attempts, m.nonce, merge_class
    )
}

/// Parses meta written by [`encode_meta`] or by a script.
pub fn decode_meta(raw: &str) -> Result<Meta> {
    let corrupt = || Error::Corrupt(format!("item meta {raw:?}"));
    let mut parts = raw.splitn(5, '|');
    let mut next = || parts.next().ok_or_else(corrupt);
    let due_at_ms = next()?.parse().map_err(|_| corrupt())?;
    let max_attempts = next()?.parse().map_err(|_| corrupt())?;
    let attempts = next()?.parse().map_err(|_| corrupt())?;
    let nonce = u64::from_str_radix(next()?, 16).map_err(|_| corrupt())?;
    next()?; // merge class: derivable from the body
    Ok(Meta {
        due_at_ms,
        max_attempts,
        attempts,
        nonce,
    })
}

/// Joins body and meta into an [`Item`].
pub fn item_from_parts(id: String, body: Body, meta: &Meta, attempt: u32) -> Item {
    Item {
        id,
        key: body.key,
        handler: body.handler,
        due_at_ms: meta.due_at_ms,
        payload: body.payload,
        max_attempts: meta.max_attempts,
        merge_key: body.merge_key,
        attempt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trips_and_rejects_garbage() {
        let raw = encode_body("user:1", "remind", Some("u1"), b"\x00\xffpayload");
        let b = decode_body(&raw).unwrap();
        assert_eq!(b.key, "user:1");
        assert_eq!(b.handler, "remind");
        assert_eq!(b.merge_key.as_deref(), Some("u1"));
        assert_eq!(&b.payload[..], b"\x00\xffpayload");
        let none = decode_body(&encode_body("k", "h", None, b"")).unwrap();
        assert_eq!(none.merge_key, None);
        for bad in [&b""[..], b"\x02", b"\x01\x05\x00\x00\x00ab", &raw[..raw.len() - 1]] {
            assert!(matches!(decode_body(bad), Err(Error::Corrupt(_))), "{bad:?}");
        }
        let mut trailing = raw.clone();
        trailing.push(0);
        assert!(decode_body(&trailing).is_err());
    }

    #[test]
    fn meta_round_trips() {
        let m = Meta {
            due_at_ms: 1_700_000_000_123,
            max_attempts: 5,
            attempts: 2,
            nonce: 0xdead_beef,
        };
        let s = encode_meta(&m, &merge_class("h", "k", Some("a|b")));
        assert_eq!(decode_meta(&s).unwrap(), m);
        assert!(decode_meta("1|2|x|00|").is_err());
        assert!(decode_meta("garbage").is_err());
    }
}
