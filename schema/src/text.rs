//! Text that came from outside (a client's field name, a worker's error)
//! quoted in a message or kept in a record: cut to a bound, so that what
//! quotes it stays small whatever was sent.

/// `s` whole if it is at most `max` bytes; else its first bytes (up to a
/// character boundary) and how long it was.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(24);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_stays_and_long_text_is_cut_at_a_character() {
        assert_eq!(cut("abc", 10), "abc");
        let long = "é".repeat(1000);
        let c = cut(&long, 100);
        assert!(c.len() <= 100, "{}", c.len());
        assert!(c.ends_with("... (2000 bytes)"), "{c}");
    }
}
