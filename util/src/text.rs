//! Text that came from a peer (an agent's host name, an error message, a proxy's reply)
//! reaches terminals and log files. Control characters in it could clear a screen, move
//! the cursor or forge a line; bidirectional overrides could reorder what a reader sees.
//! [`printable`] escapes them, and nothing else.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with every control character (C0, DEL, C1) and every bidirectional-override
/// character written as a `\u{…}` escape; text without them is returned as it is.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Whether `text` would come back from [`printable`] unchanged.
pub fn is_printable(text: &str) -> bool {
    !text.chars().any(needs_escape)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_and_bidi_overrides_are_escaped_and_the_rest_kept() {
        let forged = "db\x1b[2J\x1b[H\x1b]0;pwned\x07server ok\r\n\u{202e}txt.exe";
        let shown = printable(forged);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert_eq!(
            shown,
            "db\\u{1b}[2J\\u{1b}[H\\u{1b}]0;pwned\\u{7}server ok\\u{d}\\u{a}\\u{202e}txt.exe"
        );
        assert!(matches!(printable("web-01 Grüße ✓"), Cow::Borrowed(_)));
        assert!(is_printable("Debian GNU/Linux 12"));
        assert!(!is_printable("a\u{9b}b"), "C1 CSI is a control character");
    }
}
