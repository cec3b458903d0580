//! Input limits and the checks that enforce them. Every check returns
//! [`Error::InvalidArgument`] naming the field, before anything touches a store.

use crate::error::{Error, Result};

/// Largest item payload accepted, in bytes (64 KiB).
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Longest item id, routing key or merge key, in bytes.
pub const MAX_ID_BYTES: usize = 512;
/// Longest handler name, in bytes.
pub const MAX_HANDLER_BYTES: usize = 128;
/// Largest `max_attempts` accepted.
pub const MAX_ATTEMPTS: u32 = 100;
/// Latest due time accepted: 9999-12-31T23:59:59.999Z.
pub const MAX_DUE_AT_MS: i64 = 253_402_300_799_999;
/// Most items accepted in one enqueue call.
pub const MAX_BATCH_ITEMS: usize = 100_000;
/// Dead letters listed when a call does not say how many.
pub const DEFAULT_DEAD_LETTER_LIST: usize = 100;
/// Most dead letters one listing call returns.
pub const MAX_DEAD_LETTER_LIST: usize = 1_000;
/// Most dead letters one requeue call moves.
pub const MAX_REQUEUE_ITEMS: usize = 100_000;

/// Checks an identifier-like string: non-empty, at most `max` bytes, no control
/// characters (they would break the store's key and index encodings and logs).
pub fn check_text(field: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes, the limit is {max}", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(
            field,
            format!("contains the control character {c:?}"),
        ));
    }
    Ok(())
}

/// Checks a handler name: 1..=128 bytes of `[A-Za-z0-9_.:-]`.
pub fn check_handler(field: &str, value: &str) -> Result<()> {
    check_text(field, value, MAX_HANDLER_BYTES)?;
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(Error::invalid(
            field,
            format!("contains {c:?}; use letters, digits, '_', '.', ':' or '-'"),
        ));
    }
    Ok(())
}

/// The namespace of names written without one (`nightly`): today's behaviour.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Longest namespace name.
pub const MAX_NAMESPACE_BYTES: usize = 63;

/// The namespace of a job or worker group name: what comes before its one `/`
/// (`payments/nightly` → `payments`), [`DEFAULT_NAMESPACE`] without one.
pub fn namespace_of(name: &str) -> &str {
    name.split_once('/').map_or(DEFAULT_NAMESPACE, |(ns, _)| ns)
}

/// Checks a namespace name: 1..=63 of `[a-z0-9-]`, starting with a letter or digit
/// (a DNS label, as Kubernetes namespaces are).
pub fn check_namespace(field: &str, ns: &str) -> Result<()> {
    let ok = !ns.is_empty()
        && ns.len() <= MAX_NAMESPACE_BYTES
        && !ns.starts_with('-')
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "namespace {ns:?}: 1..={MAX_NAMESPACE_BYTES} of a-z 0-9 -, not starting with -"
            ),
        ))
    }
}

/// Checks a job, worker group or item handler name, which may carry a namespace:
/// `<name>` (the default namespace) or `<namespace>/<name>`, the name as
/// [`check_handler`] says and the namespace as [`check_namespace`] says. The default
/// namespace is written bare, so every name has one spelling.
pub fn check_qualified(field: &str, value: &str) -> Result<()> {
    match value.split_once('/') {
        None => check_handler(field, value),
        Some((ns, name)) => {
            check_namespace(field, ns)?;
            if ns == DEFAULT_NAMESPACE {
                return Err(Error::invalid(
                    field,
                    format!("write {name:?}: the default namespace has no prefix"),
                ));
            }
            check_text(field, value, MAX_HANDLER_BYTES + 1 + MAX_NAMESPACE_BYTES)?;
            if name.contains('/') {
                return Err(Error::invalid(field, "has more than one '/'"));
            }
            check_handler(field, name)
        }
    }
}

/// Checks a due time in Unix milliseconds.
pub fn check_due(field: &str, due_at_ms: i64) -> Result<()> {
    if !(0..=MAX_DUE_AT_MS).contains(&due_at_ms) {
        return Err(Error::invalid(
            field,
            format!("{due_at_ms} is outside 0..={MAX_DUE_AT_MS} (Unix milliseconds)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_may_carry_one_namespace() {
        assert_eq!(namespace_of("nightly"), "default");
        assert_eq!(namespace_of("payments/nightly"), "payments");
        for ok in ["nightly", "payments/nightly", "team-7/a.b:c_d-e"] {
            check_qualified("name", ok).unwrap();
        }
        for (bad, says) in [
            ("default/nightly", "no prefix"),
            ("Payments/nightly", "namespace"),
            ("-x/nightly", "namespace"),
            ("/nightly", "namespace"),
            ("a/b/c", "more than one"),
            ("a/", "empty"),
            ("a/b c", "contains"),
        ] {
            let e = check_qualified("name", bad).unwrap_err().to_string();
            assert!(e.contains("name") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn text_limits_name_the_field() {
        let e = check_text("id", "", 10).unwrap_err().to_string();
        assert!(e.contains("invalid id"), "{e}");
        let e = check_text("key", "a\u{0}b", 10).unwrap_err().to_string();
        assert!(e.contains("control"), "{e}");
        let e = check_text("key", "abcdefghijk", 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("11 bytes"), "{e}");
        assert!(check_text("id", "coupon:7:user:42", 512).is_ok());
    }

    #[test]
    fn handler_charset() {
        assert!(check_handler("handler", "coupon.remind-v2").is_ok());
        let e = check_handler("handler", "bad name")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid handler"), "{e}");
    }

    #[test]
    fn due_bounds() {
        assert!(check_due("due_at_ms", 0).is_ok());
        assert!(check_due("due_at_ms", -1).is_err());
        assert!(check_due("due_at_ms", MAX_DUE_AT_MS + 1).is_err());
    }
}
