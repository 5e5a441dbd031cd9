//! The checks on text that users choose and others see or match against: display and
//! channel names, email addresses and reaction emoji. They are pure functions of the input,
//! so every embedder (the gateway, or a program that embeds the engine) gets the same rules.
//!
//! - **Names** are trimmed, 1 to a limit of characters, with no control characters.
//! - **Channel names** are first normalised: default-ignorable code points (zero-width
//!   spaces and joiners, bidirectional controls, variation selectors, soft hyphens, ...)
//!   are removed and the rest is put in Unicode NFKC, so that two names that look the same
//!   are the same name. The normalised name is the one stored and shown. Uniqueness in a
//!   workspace compares the lowercase of the normalised name: `General` and `general` are
//!   one name, as in Slack (which lowercases every channel name); the case typed is kept.
//! - **Emails** are a subset of RFC 5321/5322's addr-spec, the dot-atom form that mail
//!   systems accept everywhere: see [`check_email`]. Addresses are compared without regard
//!   to case, the local part included: every large mail provider treats it so, and two
//!   accounts differing only in case would be a trap.
//! - **Emoji** are a Slack-style shortcode or one Unicode emoji sequence: see
//!   [`check_emoji`].

use super::{DomainError, EMAIL_BYTES_MAX, EMOJI_BYTES_MAX};
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{EmojiStatus, UnicodeEmoji};

/// Longest local part (before the `@`) of an email address, in bytes (RFC 5321 §4.5.3.1.1).
pub const EMAIL_LOCAL_BYTES_MAX: usize = 64;
/// Longest label of a domain name, in bytes (RFC 1035 §2.3.4).
pub const DOMAIN_LABEL_BYTES_MAX: usize = 63;

/// Checks a display or channel name: trimmed, 1..=max characters, no control characters.
pub(crate) fn check_name(what: &str, name: &str, max: usize) -> Result<String, DomainError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(DomainError::Invalid(format!("{what} must not be empty")));
    }
    if name.chars().count() > max {
        return Err(DomainError::Invalid(format!(
            "{what} is longer than {max} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(DomainError::Invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(name.to_owned())
}

/// Whether a code point is `Default_Ignorable_Code_Point` (Unicode's DerivedCoreProperties):
/// invisible by default, so a name may not differ from another by one. The set is small
/// and stable across Unicode versions; the reserved ranges are in it so that a code point
/// assigned later is ignored too.
pub fn is_default_ignorable(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x034F
            | 0x061C
            | 0x115F..=0x1160
            | 0x17B4..=0x17B5
            | 0x180B..=0x180F
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x206F
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFEFF
            | 0xFFA0
            | 0xFFF0..=0xFFF8
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
    )
}

/// A name with its default-ignorable code points removed and the rest in NFKC, trimmed.
/// Ignorables are removed before NFKC too, so that one between two code points that compose
/// cannot keep them apart.
pub fn normalize_name(name: &str) -> String {
    let visible: String = name.chars().filter(|c| !is_default_ignorable(*c)).collect();
    let normal: String = visible
        .nfkc()
        .filter(|c| !is_default_ignorable(*c))
        .collect();
    normal.trim().to_owned()
}

/// A channel name as stored: normalised ([`normalize_name`]), then 1..=max characters with
/// no spaces and no control characters. A name of nothing but ignorable code points is
/// empty, and refused.
pub fn channel_name(name: &str, max: usize) -> Result<String, DomainError> {
    let name = check_name("name", &normalize_name(name), max)?;
    if name.chars().any(char::is_whitespace) {
        return Err(DomainError::Invalid("channel names have no spaces".into()));
    }
    Ok(name)
}

/// The key under which a channel name is unique in its workspace: the normalised name in
/// lowercase. Names stored before normalisation get the key they would have now.
pub fn channel_name_key(name: &str) -> String {
    normalize_name(name).to_lowercase()
}

/// The key under which an email address is unique: trimmed and lowercased. It is the key
/// accounts have always had, so accounts made before [`check_email`] existed keep logging
/// in.
pub fn email_key(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Checks an email address (already trimmed) against the dot-atom subset of RFC 5322's
/// addr-spec, as RFC 5321 bounds it: one `@`; a local part of 1 to 64 bytes of `atext`
/// (letters, digits and ``!#$%&'*+-/=?^_`{|}~``) and dots, with no dot first, last or twice
/// in a row; a domain of at least two labels of letters, digits and hyphens (1 to 63 bytes
/// each, no hyphen first or last), the last of them not all digits (RFC 3696 §2); 254 bytes
/// in all. Quoted local parts, address literals (`[192.0.2.1]`) and internationalised
/// addresses (RFC 6531) are refused: a domain in another script is written in its ASCII
/// (`xn--`) form.
pub fn check_email(email: &str) -> Result<(), DomainError> {
    let invalid = |why: &str| Err(DomainError::Invalid(format!("email is not valid: {why}")));
    if email.len() > EMAIL_BYTES_MAX {
        return invalid("longer than 254 bytes");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return invalid("no @");
    };
    if !local_part_ok(local) {
        return invalid("the part before the @");
    }
    if !domain_ok(domain) {
        return invalid("the domain");
    }
    Ok(())
}

fn local_part_ok(local: &str) -> bool {
    let atext = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b);
    (1..=EMAIL_LOCAL_BYTES_MAX).contains(&local.len())
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(atext))
}

fn domain_ok(domain: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=DOMAIN_LABEL_BYTES_MAX).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let labels: Vec<&str> = domain.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| label_ok(l))
        && labels
            .last()
            .is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks a reaction emoji: a shortcode of 1 to 64 of `a-z`, `0-9`, `_`, `+` and `-` (as
/// Slack names them: `+1`, `tada`, `white_check_mark`), or exactly one Unicode emoji
/// sequence of at most 64 bytes (`👍`, `👍🏽`, `🇫🇷`, `👨‍👩‍👧`, `1️⃣`, `🏴󠁧󠁢󠁳󠁣󠁴󠁿`); see
/// [`is_emoji_sequence`]. Anything else (markup, spaces, words with capitals, two emoji in
/// one) is refused.
pub fn check_emoji(emoji: &str) -> Result<(), DomainError> {
    let shortcode = |e: &str| {
        e.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_+-".contains(&b))
    };
    let ok = !emoji.is_empty()
        && emoji.len() <= EMOJI_BYTES_MAX
        && if emoji.is_ascii() {
            shortcode(emoji)
        } else {
            is_emoji_sequence(emoji)
        };
    if ok {
        Ok(())
    } else {
        Err(DomainError::Invalid(format!(
            "emoji must be a shortcode of 1 to {EMOJI_BYTES_MAX} of a-z, 0-9, _, + and -, \
             or one Unicode emoji"
        )))
    }
}

const ZWJ: char = '\u{200D}';
const VS16: char = '\u{FE0F}';
const KEYCAP: char = '\u{20E3}';
const CANCEL_TAG: char = '\u{E007F}';

/// Whether `s` is exactly one emoji sequence, by the grammar of a possible emoji in
/// Unicode Technical Standard #51 (§ EBNF and Regex): elements joined by ZWJ (U+200D), each
/// a regional-indicator pair (a flag), a keycap (`0-9`, `#` or `*`, an optional U+FE0F,
/// then U+20E3), or an `Emoji` code point other than ASCII followed by at most one of: a
/// skin-tone modifier, U+FE0F (and a keycap mark), or a tag sequence ending in CANCEL TAG.
pub fn is_emoji_sequence(s: &str) -> bool {
    let mut chars = s.chars().peekable();
    loop {
        if !zwj_element(&mut chars) {
            return false;
        }
        match chars.next() {
            None => return true,
            Some(ZWJ) => continue,
            Some(_) => return false,
        }
    }
}

fn zwj_element(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> bool {
    let Some(base) = chars.next() else {
        return false;
    };
    if is_regional_indicator(base) {
        return chars.next().is_some_and(is_regional_indicator);
    }
    if base.is_ascii() {
        // The only ASCII in an emoji is the base of a keycap.
        let keycap_base = base.is_ascii_digit() || base == '#' || base == '*';
        chars.next_if_eq(&VS16);
        return keycap_base && chars.next_if_eq(&KEYCAP).is_some();
    }
    if !base.is_emoji_char() {
        return false;
    }
    match chars.peek().copied() {
        Some(c) if is_modifier(c) => {
            chars.next();
        }
        Some(VS16) => {
            chars.next();
            chars.next_if_eq(&KEYCAP);
        }
        Some(c) if is_tag(c) => {
            while chars.next_if(|c| is_tag(*c)).is_some() {}
            return chars.next_if_eq(&CANCEL_TAG).is_some();
        }
        _ => {}
    }
    true
}

fn is_regional_indicator(c: char) -> bool {
    matches!(c, '\u{1F1E6}'..='\u{1F1FF}')
}

/// `Emoji_Modifier`: the five skin tones.
fn is_modifier(c: char) -> bool {
    c.emoji_status() == EmojiStatus::EmojiPresentationAndModifierAndEmojiComponent
}

/// A tag character of a tag sequence, other than the CANCEL TAG that ends it.
fn is_tag(c: char) -> bool {
    matches!(c, '\u{E0020}'..='\u{E007E}')
}

#[cfg(test)]
mod tests {
    use super::*;

    // Addresses mail systems accept pass; the malformed ones of the adversarial test, and
    // each rule's edge, fail.
    #[test]
    fn emails() {
        let local_max = format!("{}@example.com", "l".repeat(64));
        let label_max = format!("a@{}.com", "d".repeat(63));
        let local_over = format!("{}@example.com", "l".repeat(65));
        let label_over = format!("a@{}.com", "d".repeat(64));
        for good in [
            "a@example.com",
            "first.last+tag@sub.example.co.uk",
            "o'brien@example.ie",
            "x_y-z!#$%&*/=?^`{|}~@ex-ample.io",
            "UPPER@EXAMPLE.COM",
            "a@xn--bcher-kva.example",
            local_max.as_str(),
            label_max.as_str(),
        ] {
            assert_eq!(check_email(good), Ok(()), "{good}");
        }
        let long_domain = format!("a@{}.com", vec!["d".repeat(60); 5].join("."));
        for bad in [
            "<>@example.com;DROP",
            "",
            "plain",
            "@example.com",
            "a@",
            "a@@example.com",
            "a@b@example.com",
            ".a@example.com",
            "a.@example.com",
            "a..b@example.com",
            "a b@example.com",
            "\"quoted\"@example.com",
            "a@localhost",
            "a@example..com",
            "a@.example.com",
            "a@example.com.",
            "a@-example.com",
            "a@example-.com",
            "a@exa_mple.com",
            "a@[192.0.2.1]",
            "a@192.0.2.1",
            "ü@example.com",
            "a@bücher.example",
            "a@example.com;DROP",
            local_over.as_str(),
            label_over.as_str(),
            long_domain.as_str(),
        ] {
            assert!(check_email(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(email_key("  Bob@Example.COM "), "bob@example.com");
    }

    // Names that look alike normalise alike; ignorables vanish; the result is stable.
    #[test]
    fn channel_names() {
        let max = crate::domain::NAME_CHARS_MAX;
        assert_eq!(channel_name("gen\u{200B}eral", max).unwrap(), "general");
        assert_eq!(
            channel_name("\u{FEFF}general\u{2060}", max).unwrap(),
            "general"
        );
        assert_eq!(channel_name("ｇｅｎｅｒａｌ", max).unwrap(), "general");
        assert_eq!(channel_name("ﬁles", max).unwrap(), "files");
        assert_eq!(channel_name("cafe\u{0301}", max).unwrap(), "café");
        assert_eq!(channel_name("cafe\u{200D}\u{0301}", max).unwrap(), "café");
        assert_eq!(channel_name("Dev", max).unwrap(), "Dev");
        assert_eq!(channel_name_key("DEV\u{200B}"), channel_name_key("dev"));
        for bad in [
            "",
            "  ",
            "\u{200B}",
            "\u{200B}\u{200C}\u{FE0F}\u{E0041}",
            "a b",
            "a\u{3000}b",
        ] {
            assert!(
                matches!(channel_name(bad, max), Err(DomainError::Invalid(_))),
                "{bad:?}"
            );
        }
        for s in ["gen\u{200B}eral", "ｇｅｎ", "e\u{200D}\u{0301}", "Ⅻ", "ﾊﾟ"] {
            let once = normalize_name(s);
            assert_eq!(normalize_name(&once), once, "{s:?} is not stable");
        }
    }

    // Shortcodes and single emoji sequences of every kind pass; markup and the rest fail.
    #[test]
    fn emoji() {
        let long = "e".repeat(64);
        let over = "e".repeat(65);
        let joined = "👍\u{200D}".repeat(16);
        for good in [
            "+1",
            "-1",
            "tada",
            "white_check_mark",
            "100",
            long.as_str(),
            "👍",
            "👍🏽",
            "🇫🇷",
            "👨‍👩‍👧",
            "🧑🏽‍💻",
            "🏳️‍🌈",
            "❤️",
            "❤",
            "❤️‍🔥",
            "1️⃣",
            "#⃣",
            "🏴\u{E0067}\u{E0062}\u{E0073}\u{E0063}\u{E0074}\u{E007F}",
            "©",
            "🏽",
        ] {
            assert_eq!(check_emoji(good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            "<script>",
            "Tada",
            "a b",
            "x/y",
            ":tada:",
            "tab\t",
            over.as_str(),
            "👍👍",
            "👍 ",
            "a👍",
            "👍\u{200D}",
            "\u{200D}👍",
            "🇫",
            "🇫🇷🇫",
            "\u{FE0F}",
            "é",
            "€",
            "1\u{FE0F}",
            "a\u{20E3}",
            "🏴\u{E0067}\u{E0062}",
            "👍\u{200B}",
            "👍\u{FE0E}",
            "👍🏽🏽",
            joined.as_str(),
        ] {
            assert!(check_emoji(bad).is_err(), "{bad:?} was accepted");
        }
    }

    // The ignorable set agrees with the property on code points from each of its ranges
    // and their neighbours.
    #[test]
    fn default_ignorables() {
        for c in [
            '\u{AD}', '\u{200B}', '\u{200D}', '\u{202E}', '\u{2066}', '\u{FEFF}',
        ] {
            assert!(is_default_ignorable(c), "{:X}", c as u32);
        }
        for c in [
            'a',
            ' ',
            '\u{AC}',
            '\u{2010}',
            '\u{2070}',
            '\u{E1000}',
            '\u{1F44D}',
        ] {
            assert!(!is_default_ignorable(c), "{:X}", c as u32);
        }
    }
}
