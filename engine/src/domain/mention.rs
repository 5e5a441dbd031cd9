//! Mention parsing: `@here`, `@channel`, and users as `<@U…>` (Slack's form) or `@U…`.
//!
//! Parsing is by token: a mention must stand on its own or be followed by punctuation, so
//! `foo@here.com` is an email, not a mention. Unknown user IDs are kept (the notification
//! work later filters by membership); duplicates are dropped.

use super::event::Mentions;
use crate::ids::UserId;

/// Parses the mentions in a message text.
pub fn parse(text: &str) -> Mentions {
    let mut m = Mentions::default();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let at_start = i == 0 || !is_word(bytes[i - 1]);
        if bytes[i] == b'<' && text[i..].starts_with("<@") {
            if let Some(end) = text[i + 2..].find('>') {
                if let Ok(u) = text[i + 2..i + 2 + end].parse::<UserId>() {
                    push_user(&mut m, u);
                    i += end + 3;
                    continue;
                }
            }
        }
        if bytes[i] == b'@' && at_start {
            let word_end = text[i + 1..]
                .find(|c: char| !(c.is_ascii_alphanumeric()))
                .map(|e| i + 1 + e)
                .unwrap_or(text.len());
            let word = &text[i + 1..word_end];
            let followed_ok = word_end == text.len() || !is_word(bytes[word_end]);
            if followed_ok {
                match word {
                    "here" => m.here = true,
                    "channel" => m.channel = true,
                    w => {
                        if let Ok(u) = w.parse::<UserId>() {
                            push_user(&mut m, u);
                        }
                    }
                }
            }
            i = word_end.max(i + 1);
            continue;
        }
        i += 1;
    }
    m
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn push_user(m: &mut Mentions, u: UserId) {
    if !m.users.contains(&u) {
        m.users.push(u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The three mention forms are found; emails and word-internal @ are not mentions.
    #[test]
    fn parses_mentions() {
        let u1 = UserId(1).to_string();
        let u2 = UserId(40).to_string();
        let m = parse(&format!("hi <@{u1}> and @{u2}, @here! also <@{u1}>"));
        assert_eq!(m.users, vec![UserId(1), UserId(40)]);
        assert!(m.here && !m.channel);
        let m = parse("mail me at bob@here.com or a@channel");
        assert_eq!(m, Mentions::default());
        let m = parse("@channel: deploy is done");
        assert!(m.channel);
        assert_eq!(parse("@").users, vec![]);
        assert_eq!(parse("<@nope>").users, vec![]);
    }
}
