//! Encodings of an item inside Redis.
//!
//! The **body** (`items` hash, one field per item) is written once at enqueue and
//! read by Rust on delivery; Lua treats it as opaque except for its short text
//! header, which it reads on rare paths (reaping, retry, reschedule):
//!
//! ```text
//! <max_attempts>|<due_at_ms>|<v:u8=2><key><handler><merge_key><payload>
//! <max_attempts>|<due_at_ms>|<v:u8=3><key><handler><merge_key><payload><traceparent>
//! ```
//!
//! where each binary field is a `u32 LE` length then bytes. Version 3 adds the
//! producer's W3C trace context; an item without one is written as version 2, so
//! workers that predate tracing read every item enqueued without a trace context
//! (a rolling upgrade turns tracing on only after every worker reads version 3).
//! Lua reads only the key and the handler, the first two fields of either.
//!
//! Attempts never touch the body either: an in-flight delivery carries its attempt
//! number in its member of the in-flight set (`id \x01 seq \x01 attempt`), or is a
//! first attempt at a position of its pop's batch (see `lua/common.lua`), and only
//! items that leave the in-flight set unsettled (retry, reaped, handed back) get a
//! count in the `att` hash. A first attempt that succeeds writes no count at all.
//!
//! The merge class of an item is `handler \x01 key \x01 merge_key`. Control
//! characters are refused in every one of those fields, so `\x01` cannot occur inside
//! them and the class is unambiguous; item ids cannot contain it either, which makes
//! in-flight members unambiguous too.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::queue::Item;
use crate::trace::TraceContext;

/// Bodies without a trace context.
const BODY_V2: u8 = 2;
/// Bodies with one: a fifth field.
const BODY_V3: u8 = 3;

/// The separator inside merge classes and in-flight members.
pub const SEP: char = '\u{1}';

/// Body fields of an item, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// Scheduled due time (the latest asked for).
    pub due_at_ms: i64,
    /// Routing key.
    pub key: String,
    /// Handler name.
    pub handler: String,
    /// Merge key.
    pub merge_key: Option<String>,
    /// Payload.
    pub payload: Bytes,
    /// The producer's trace context.
    pub traceparent: Option<TraceContext>,
}

/// Encodes a body (see the module doc for the layout).
pub fn encode_body(b: &Body) -> Vec<u8> {
    let mk = b.merge_key.as_deref().unwrap_or("");
    let head = format!("{}|{}|", b.max_attempts, b.due_at_ms);
    let tp = b.traceparent.map(|t| t.to_string());
    let mut out = Vec::with_capacity(
        head.len() + 80 + b.key.len() + b.handler.len() + mk.len() + b.payload.len(),
    );
    out.extend_from_slice(head.as_bytes());
    out.push(if tp.is_some() { BODY_V3 } else { BODY_V2 });
    let fields = [
        b.key.as_bytes(),
        b.handler.as_bytes(),
        mk.as_bytes(),
        &b.payload,
    ];
    for field in fields.into_iter().chain(tp.as_ref().map(|t| t.as_bytes())) {
        out.extend_from_slice(&(field.len() as u32).to_le_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// Decodes a body written by [`encode_body`] (or rewritten by the reschedule script).
pub fn decode_body(raw: &[u8]) -> Result<Body> {
    let corrupt = |why: &str| Error::Corrupt(format!("item body: {why}"));
    let mut head = raw.splitn(3, |b| *b == b'|');
    let mut number = |what: &str| -> Result<i64> {
        let f = head.next().ok_or_else(|| corrupt(what))?;
        std::str::from_utf8(f)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt(what))
    };
    let max_attempts =
        u32::try_from(number("max_attempts")?).map_err(|_| corrupt("max_attempts"))?;
    let due_at_ms = number("due_at_ms")?;
    let rest = head.next().ok_or_else(|| corrupt("no binary part"))?;
    let (&version, mut rest) = rest.split_first().ok_or_else(|| corrupt("empty"))?;
    let count = match version {
        BODY_V2 => 4,
        BODY_V3 => 5,
        _ => return Err(corrupt(&format!("unknown version {version}"))),
    };
    let mut fields: [&[u8]; 5] = [&[]; 5];
    for f in fields.iter_mut().take(count) {
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
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| corrupt("field is not UTF-8"));
    let mk = text(fields[2])?;
    let traceparent = match count {
        5 => Some(
            TraceContext::parse(&text(fields[4])?)
                .map_err(|e| corrupt(&format!("traceparent: {e}")))?,
        ),
        _ => None,
    };
    Ok(Body {
        max_attempts,
        due_at_ms,
        key: text(fields[0])?,
        handler: text(fields[1])?,
        merge_key: (!mk.is_empty()).then_some(mk),
        payload: Bytes::copy_from_slice(fields[3]),
        traceparent,
    })
}

/// The merge class of an item: who it may be merged with. Empty without merge key.
pub fn merge_class(handler: &str, key: &str, merge_key: Option<&str>) -> String {
    match merge_key {
        Some(mk) => format!("{handler}{SEP}{key}{SEP}{mk}"),
        None => String::new(),
    }
}

/// Parses an `att` value: attempts made (absent means none).
pub fn decode_attempts(raw: Option<&str>) -> Result<u32> {
    raw.map_or(Ok(0), |r| {
        r.parse()
            .map_err(|_| Error::Corrupt(format!("attempts {r:?}")))
    })
}

/// Parses an in-flight member `id \x01 seq \x01 attempt` into its attempt number.
pub fn member_attempt(member: &str) -> Result<u32> {
    member
        .rsplit(SEP)
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| Error::Corrupt(format!("in-flight member {member:?}")))
}

/// Escapes Redis glob characters so `s` matches only itself in `MATCH`.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Joins a body and an attempt count into an [`Item`].
pub fn item_from_body(id: String, body: Body, attempt: u32) -> Item {
    Item {
        id,
        key: body.key,
        handler: body.handler,
        due_at_ms: body.due_at_ms,
        payload: body.payload,
        max_attempts: body.max_attempts,
        merge_key: body.merge_key,
        attempt,
        traceparent: body.traceparent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Body {
        Body {
            max_attempts: 5,
            due_at_ms: 1_700_000_000_123,
            key: "user:1".into(),
            handler: "remind".into(),
            merge_key: Some("u1".into()),
            payload: Bytes::from_static(b"\x00\xff|payload"),
            traceparent: None,
        }
    }

    #[test]
    fn body_round_trips_and_rejects_garbage() {
        let raw = encode_body(&body());
        assert!(raw.starts_with(b"5|1700000000123|"));
        assert_eq!(decode_body(&raw).unwrap(), body());
        let none = Body {
            merge_key: None,
            payload: Bytes::new(),
            ..body()
        };
        assert_eq!(decode_body(&encode_body(&none)).unwrap(), none);
        for bad in [
            &b""[..],
            b"1|2|",
            b"1|2|\x03",
            b"x|2|\x02",
            b"1|2|\x02\x05\x00\x00\x00ab",
        ] {
            assert!(
                matches!(decode_body(bad), Err(Error::Corrupt(_))),
                "{bad:?}"
            );
        }
        assert!(decode_body(&raw[..raw.len() - 1]).is_err());
        // With a trace context: version 3, a fifth field; the header Lua reads
        // and the first two fields are where they were.
        let traced = Body {
            traceparent: Some(
                TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                    .unwrap(),
            ),
            ..body()
        };
        let raw3 = encode_body(&traced);
        assert_eq!(raw3[16], BODY_V3);
        assert_eq!(
            &raw3[..raw.len()],
            &{
                let mut r = raw.clone();
                r[16] = BODY_V3;
                r
            }[..]
        );
        assert_eq!(decode_body(&raw3).unwrap(), traced);
        let mut bad_tp = raw3.clone();
        let at = bad_tp.len() - 2;
        bad_tp[at] = b'X';
        assert!(matches!(decode_body(&bad_tp), Err(Error::Corrupt(_))));
        let mut trailing = raw.clone();
        trailing.push(0);
        assert!(decode_body(&trailing).is_err());
    }

    #[test]
    fn attempts_and_members_parse() {
        assert_eq!(decode_attempts(None).unwrap(), 0);
        assert_eq!(decode_attempts(Some("3")).unwrap(), 3);
        assert!(decode_attempts(Some("a")).is_err());
        assert_eq!(member_attempt("id\u{1}17\u{1}2").unwrap(), 2);
        assert!(member_attempt("id").is_err());
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
