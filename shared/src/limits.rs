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
