//! Target `item_codec`: what the Redis store decodes from Redis values.
//!
//! One input is tried as every such value: an item body (`decode_body`; a decoded
//! body must re-encode to bytes that decode to the same body, and make an item with
//! the same fields), an `att` count (`decode_attempts`), an in-flight member
//! (`member_attempt`), a queue layout (the layout script's JSON answer: `home`,
//! `homes` and `poll_count` keep their documented shape), and a string for
//! `glob_escape` (escaping, then unescaping, gives it back).

use bytes::Bytes;
use chime_shared::Error;
use chime_shared::queue::Layout;
use chime_shared::queue::codec::{
    self, Body, decode_attempts, decode_body, encode_body, glob_escape, item_from_body,
    member_attempt,
};

use super::{bucket, coarse, signal};
use crate::Target;

/// The target.
pub const TARGET: Target = Target {
    name: "item_codec",
    about: "Redis values: item body decode/encode round trip, attempts, in-flight members, layout JSON, glob escaping",
    run,
    dictionary,
};

fn err_class(e: &Error) -> String {
    match e {
        Error::Corrupt(m) => format!("corrupt {}", coarse(m)),
        other => panic!("a decoder answered a non-corruption error: {other}"),
    }
}

fn check_body(b: &Body) {
    let raw = encode_body(b);
    match decode_body(&raw) {
        Ok(back) => assert_eq!(&back, b, "body changed through encode/decode"),
        Err(e) => panic!("an encoded body does not decode: {e}"),
    }
    let item = item_from_body("id".into(), b.clone(), 3);
    assert_eq!(item.key, b.key);
    assert_eq!(item.handler, b.handler);
    assert_eq!(item.due_at_ms, b.due_at_ms);
    assert_eq!(item.max_attempts, b.max_attempts);
    assert_eq!(item.merge_key, b.merge_key);
    assert_eq!(item.payload, b.payload);
    assert_eq!(item.attempt, 3);
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn check_layout(l: &Layout) -> String {
    for key in ["", "user:1", "k"] {
        let home = l.home(key);
        assert!(
            home < l.count.max(1),
            "home {home} outside {} queues",
            l.count
        );
        let homes = l.homes(key);
        assert_eq!(
            homes.last(),
            Some(&home),
            "homes must end with the current home"
        );
        let mut sorted = homes.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), homes.len(), "homes repeat a queue: {homes:?}");
    }
    let poll = l.poll_count();
    assert!(poll >= l.count, "poll_count {poll} below count {}", l.count);
    format!("layout draining={}", bucket(l.draining.len()))
}

fn run(input: &[u8]) -> u64 {
    let body = match decode_body(input) {
        Ok(b) => {
            check_body(&b);
            format!(
                "body mk={} payload={}",
                b.merge_key.is_some(),
                bucket(b.payload.len())
            )
        }
        Err(e) => err_class(&e),
    };
    let text = String::from_utf8_lossy(input);
    let attempts = match decode_attempts(Some(&text)) {
        Ok(_) => "att".to_owned(),
        Err(e) => err_class(&e),
    };
    let member = match member_attempt(&text) {
        Ok(_) => "member".to_owned(),
        Err(e) => err_class(&e),
    };
    let layout = match serde_json::from_slice::<Layout>(input) {
        Ok(l) => check_layout(&l),
        Err(e) => format!("layout {:?}", e.classify()),
    };
    let escaped = glob_escape(&text);
    assert_eq!(unescape(&escaped), text, "glob_escape is not reversible");
    // The merge class joins three fields with SEP; it is empty without a merge key.
    assert!(codec::merge_class("h", &text, None).is_empty());
    let class = codec::merge_class("h", "k", Some(&text));
    assert_eq!(class.strip_prefix("h\u{1}k\u{1}"), Some(&*text));
    signal(&[&body, &attempts, &member, &layout])
}

/// Seeds for [`crate::seeds`]: bodies encoded by chime's own encoder.
pub fn seed_bodies() -> Vec<(&'static str, Body)> {
    let typical = Body {
        max_attempts: 5,
        due_at_ms: 1_700_000_000_123,
        key: "user:1".into(),
        handler: "remind".into(),
        merge_key: Some("u1".into()),
        payload: Bytes::from_static(b"\x00\xff|payload"),
        traceparent: None,
    };
    vec![
        ("typical", typical.clone()),
        (
            "minimal",
            Body {
                max_attempts: 1,
                due_at_ms: 0,
                key: String::new(),
                handler: "h".into(),
                merge_key: None,
                payload: Bytes::new(),
                traceparent: None,
            },
        ),
        (
            "extremes",
            Body {
                max_attempts: u32::MAX,
                due_at_ms: i64::MIN,
                key: "k".repeat(512),
                handler: "h".repeat(128),
                merge_key: Some("m".repeat(512)),
                payload: Bytes::from(vec![0xa5; 1024]),
                traceparent: None,
            },
        ),
        (
            "unicode",
            Body {
                max_attempts: 100,
                due_at_ms: 253_402_300_799_999,
                key: "clé:ユーザー:🙂".into(),
                handler: "push.apns:v2-x_y".into(),
                merge_key: Some("ß".into()),
                payload: Bytes::from_static("{\"json\":true}".as_bytes()),
                traceparent: chime_shared::trace::TraceContext::parse(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .ok(),
            },
        ),
        (
            "negative-due",
            Body {
                due_at_ms: -1,
                merge_key: None,
                ..typical
            },
        ),
    ]
}

const TOKENS: &[&[u8]] = &[
    b"|",
    b"||",
    b"\x02",
    b"\x01",
    b"\x00\x00\x00\x00",
    b"\x01\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\xff\xff\xff\x7f",
    b"\x00\x00\x01\x00",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"-",
    b"+",
    b"4294967295",
    b"4294967296",
    b"-9223372036854775808",
    b"9223372036854775808",
    b"{\"epoch\":",
    b"\"count\":",
    b"\"revision\":",
    b"\"draining\":[",
    b"[1,2]",
    b"[18446744073709551615,4294967295]",
    b"}",
    b"*",
    b"?",
    b"[",
    b"]",
    b"\\",
];

fn dictionary() -> Vec<Vec<u8>> {
    TOKENS.iter().map(|t| t.to_vec()).collect()
}
