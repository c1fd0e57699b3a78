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

/// `s` with every run of non-space characters longer than `max` cut (a
/// field name a client made huge, quoted inside a parser's message), so
/// that the rest of the message still says what went wrong.
pub fn cut_long_words(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len().min(4 * max));
    let mut rest = s;
    while !rest.is_empty() {
        let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        out.push_str(&cut(&rest[..word_end], max));
        rest = &rest[word_end..];
        let space_end = rest
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(rest.len());
        out.push_str(&rest[..space_end]);
        rest = &rest[space_end..];
    }
    out
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

    #[test]
    fn long_words_are_cut_and_the_rest_stays() {
        let msg = format!(
            "unknown field `{}`, expected one of `a`",
            "f".repeat(10_000)
        );
        let c = cut_long_words(&msg, 80);
        assert!(c.starts_with("unknown field `fff"), "{c}");
        assert!(c.ends_with(" expected one of `a`"), "{c}");
        assert!(c.len() < 200, "{}", c.len());
    }
}
