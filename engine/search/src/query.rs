//! The query language of `API.md` §12, parsed into a [`Parsed`] query: pure, no index, so
//! that it can be fuzzed and tested on its own.
//!
//! A query is a list of items separated by spaces. An item is a word (`deploy`), a prefix
//! (`depl*`), a phrase in double quotes (`"deploy failed"`), any of these excluded with a
//! leading `-`, or an operator `name:value` (`in:`, `from:`, `before:`, `after:`, `on:`,
//! `has:`, `is:`). Every included item must match (AND). An item that is not an operator
//! is cut into terms by [`crate::text`] exactly as indexed text is, so `e-mail` is the
//! phrase `e mail` and `東京都` the phrase of its bigrams.

use chorus_engine::ids::{ChannelId, UserId};

/// The longest query, in characters (`API.md` §12).
pub const QUERY_CHARS_MAX: usize = 1000;
/// The shortest word that also matches words one edit away.
pub const FUZZY_LETTERS_MIN: usize = 5;
const MICROS_PER_DAY: i64 = 86_400 * 1_000_000;

/// A text item: everything in it must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// The folded words, in order; two or more match as a phrase.
    pub words: Vec<String>,
    /// The CJK runs it holds, as written; each matches as a run.
    pub cjk: Vec<String>,
    /// `word*`: the last word is a prefix.
    pub prefix: bool,
    /// Written in double quotes: matched exactly, never one edit away.
    pub quoted: bool,
}

impl Match {
    /// Whether its single word also matches words one edit away.
    pub fn fuzzy(&self) -> bool {
        !self.quoted
            && !self.prefix
            && self.words.len() == 1
            && crate::text::letters(&self.words[0]) >= FUZZY_LETTERS_MIN
    }
}

/// A channel named by `in:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelRef {
    /// `in:C…`.
    Id(ChannelId),
    /// `in:#name` or `in:name`, lowercased.
    Name(String),
}

/// An author named by `from:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserRef {
    /// `from:U…`.
    Id(UserId),
    /// `from:me`.
    Me,
}

/// A parsed query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Items that must all match.
    pub include: Vec<Match>,
    /// Items none of which may match.
    pub exclude: Vec<Match>,
    /// `in:` operators: the message is in one of them (empty: no restriction).
    pub channels: Vec<ChannelRef>,
    /// `from:` operators: the message is by one of them (empty: no restriction).
    pub authors: Vec<UserRef>,
    /// Time windows from `before:`, `after:` and `on:`, in microseconds since the epoch,
    /// `[from, to)`; the message's creation time is in every one.
    pub windows: Vec<(i64, i64)>,
    /// `has:file`.
    pub has_file: bool,
    /// `has:reaction`.
    pub has_reaction: bool,
    /// `is:thread`: replies only.
    pub is_thread: bool,
}

impl Parsed {
    /// Whether anything beyond the caller's readable set restricts the results.
    fn restricts(&self) -> bool {
        !self.include.is_empty()
            || !self.exclude.is_empty()
            || !self.channels.is_empty()
            || !self.authors.is_empty()
            || !self.windows.is_empty()
            || self.has_file
            || self.has_reaction
            || self.is_thread
    }
}

/// Why a query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Over [`QUERY_CHARS_MAX`].
    #[error("q is over {QUERY_CHARS_MAX} characters")]
    TooLong,
    /// No word, phrase or operator.
    #[error("q holds no word, phrase or operator to search for")]
    Empty,
    /// An operator with a value it does not take.
    #[error("{op}: takes {expected}, not {value:?}")]
    BadValue {
        /// The operator.
        op: &'static str,
        /// The value given.
        value: String,
        /// What it takes.
        expected: &'static str,
    },
    /// `-in:` and the like.
    #[error("the operator {0}: cannot be excluded with -")]
    NegatedOperator(&'static str),
    /// `has:` or `is:` in a file search: they describe messages.
    #[error("the operator {0}: applies to messages, not to file search")]
    NotForFiles(&'static str),
}

const OPERATORS: [&str; 7] = ["in", "from", "before", "after", "on", "has", "is"];

/// Parses `q`.
pub fn parse(q: &str) -> Result<Parsed, QueryError> {
    if q.chars().count() > QUERY_CHARS_MAX {
        return Err(QueryError::TooLong);
    }
    let mut parsed = Parsed::default();
    for item in lex(q) {
        if !item.quoted {
            if let Some((op, value)) = operator(item.text) {
                if item.negated {
                    return Err(QueryError::NegatedOperator(op));
                }
                apply_operator(&mut parsed, op, value)?;
                continue;
            }
        }
        let Some(m) = text_match(&item) else { continue };
        if item.negated {
            parsed.exclude.push(m);
        } else {
            parsed.include.push(m);
        }
    }
    if !parsed.restricts() {
        return Err(QueryError::Empty);
    }
    Ok(parsed)
}

/// Parses `q` for a file search: the same language, where `from:` is the uploader, the
/// dates are the upload's, and `in:` names a channel where the file is shared; `has:` and
/// `is:` describe messages and are refused.
pub fn parse_files(q: &str) -> Result<Parsed, QueryError> {
    let parsed = parse(q)?;
    if parsed.has_file || parsed.has_reaction {
        return Err(QueryError::NotForFiles("has"));
    }
    if parsed.is_thread {
        return Err(QueryError::NotForFiles("is"));
    }
    Ok(parsed)
}

/// One item of the query as written.
struct Item<'a> {
    text: &'a str,
    negated: bool,
    quoted: bool,
}

/// Cuts `q` into items: runs of non-space characters, or double-quoted phrases (an
/// unclosed quote runs to the end), each optionally led by `-`.
fn lex(q: &str) -> Vec<Item<'_>> {
    let mut items = Vec::new();
    let mut rest = q;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return items;
        }
        let negated = rest.len() > 1 && rest.starts_with('-');
        if negated {
            rest = &rest[1..];
        }
        if let Some(body) = rest.strip_prefix('"') {
            let end = body.find('"').unwrap_or(body.len());
            items.push(Item {
                text: &body[..end],
                negated,
                quoted: true,
            });
            rest = body.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            items.push(Item {
                text: &rest[..end],
                negated,
                quoted: false,
            });
            rest = &rest[end..];
        }
    }
}

/// `name:value` for a known operator name (any case).
fn operator(text: &str) -> Option<(&'static str, &str)> {
    let (name, value) = text.split_once(':')?;
    let op = OPERATORS.iter().find(|o| o.eq_ignore_ascii_case(name))?;
    Some((op, value))
}

fn apply_operator(parsed: &mut Parsed, op: &'static str, value: &str) -> Result<(), QueryError> {
    let bad = |expected| QueryError::BadValue {
        op,
        value: value.to_owned(),
        expected,
    };
    match op {
        "in" => {
            let channel = match (value.strip_prefix('#'), value.parse::<ChannelId>()) {
                (None, Ok(id)) => ChannelRef::Id(id),
                (name, _) => {
                    let name = name.unwrap_or(value);
                    if name.is_empty() {
                        return Err(bad("a channel ID or #name"));
                    }
                    ChannelRef::Name(name.to_lowercase())
                }
            };
            parsed.channels.push(channel);
        }
        "from" => {
            let author = if value.eq_ignore_ascii_case("me") {
                UserRef::Me
            } else {
                UserRef::Id(value.parse().map_err(|_| bad("a user ID or me"))?)
            };
            parsed.authors.push(author);
        }
        "before" | "after" | "on" => {
            let day = day_start_us(value).ok_or_else(|| bad("a date YYYY-MM-DD"))?;
            let window = match op {
                "before" => (i64::MIN, day),
                "after" => (day + MICROS_PER_DAY, i64::MAX),
                _ => (day, day + MICROS_PER_DAY),
            };
            parsed.windows.push(window);
        }
        "has" => match value.to_ascii_lowercase().as_str() {
            "file" => parsed.has_file = true,
            "reaction" => parsed.has_reaction = true,
            _ => return Err(bad("file or reaction")),
        },
        "is" => match value.to_ascii_lowercase().as_str() {
            "thread" => parsed.is_thread = true,
            _ => return Err(bad("thread")),
        },
        _ => unreachable!("operator {op} is listed in OPERATORS"),
    }
    Ok(())
}

/// The terms of a text item; `None` when it holds no word or CJK character.
fn text_match(item: &Item<'_>) -> Option<Match> {
    let mut text = item.text;
    let mut prefix = false;
    if !item.quoted {
        let trimmed = text.trim_end_matches('*');
        prefix = trimmed.len() < text.len();
        text = trimmed;
    }
    let words: Vec<String> = crate::text::words(text)
        .into_iter()
        .map(|p| p.term)
        .collect();
    let cjk = cjk_runs(text);
    if words.is_empty() && cjk.is_empty() {
        return None;
    }
    // A prefix applies to a last word; `東京*` is just its run.
    let prefix = prefix && !words.is_empty() && !text.ends_with(crate::text::is_cjk);
    Some(Match {
        words,
        cjk,
        prefix,
        quoted: item.quoted,
    })
}

fn cjk_runs(text: &str) -> Vec<String> {
    let mut runs = Vec::new();
    let mut run = String::new();
    for c in text.chars() {
        if crate::text::is_cjk(c) {
            run.push(c);
        } else if !run.is_empty() {
            runs.push(std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// The start of a UTC day `YYYY-MM-DD`, in microseconds since the epoch; `None` unless it
/// is a real date of years 1970 to 9999.
pub fn day_start_us(value: &str) -> Option<i64> {
    let b = value.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |s: &str| -> Option<i64> {
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, m, d) = (num(&value[0..4])?, num(&value[5..7])?, num(&value[8..10])?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if y < 1970 || d < 1 || d > days_in_month {
        return None;
    }
    Some(days_from_civil(y, m, d) * MICROS_PER_DAY)
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (the usual
/// era-based computation: 400-year eras of 146,097 days, years starting in March).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(w: &str) -> Match {
        Match {
            words: vec![w.into()],
            cjk: vec![],
            prefix: false,
            quoted: false,
        }
    }

    // Words, phrases, prefixes, exclusions and CJK runs parse into their items.
    #[test]
    fn text_items() {
        let p = parse(r#"Déploy "build FAILED" -flaky stag* -"not this" 東京都 e-mail"#).unwrap();
        assert_eq!(p.include[0], word("deploy"));
        assert_eq!(p.include[1].words, ["build", "failed"]);
        assert!(p.include[1].quoted);
        assert_eq!(p.include[2].words, ["stag"]);
        assert!(p.include[2].prefix);
        assert_eq!(p.include[3].cjk, ["東京都"]);
        assert_eq!(p.include[4].words, ["e", "mail"]);
        assert_eq!(
            p.exclude,
            vec![
                word("flaky"),
                Match {
                    words: vec!["not".into(), "this".into()],
                    cjk: vec![],
                    prefix: false,
                    quoted: true
                }
            ]
        );
        assert!(p.include[0].fuzzy() && !p.include[2].fuzzy());
        assert!(!word("four").fuzzy());
    }

    // Operators take their values, and a bad value is a clear error.
    #[test]
    fn operators() {
        let p = parse(
            "in:#General IN:C1 from:me from:U2 has:reaction is:thread has:FILE on:2024-02-29",
        )
        .unwrap();
        assert_eq!(
            p.channels,
            [
                ChannelRef::Name("general".into()),
                ChannelRef::Id(ChannelId(1))
            ]
        );
        assert_eq!(p.authors, [UserRef::Me, UserRef::Id(UserId(2))]);
        assert!(p.has_reaction && p.is_thread && p.has_file);
        let day = day_start_us("2024-02-29").unwrap();
        assert_eq!(p.windows, [(day, day + MICROS_PER_DAY)]);
        assert_eq!(day_start_us("1970-01-02"), Some(MICROS_PER_DAY));
        assert_eq!(day_start_us("2000-03-01"), Some(951_868_800 * 1_000_000));
        for bad in [
            "before:2023-02-29",
            "after:2024-13-01",
            "on:24-01-01",
            "from:bob",
            "has:cake",
            "is:open",
            "in:",
            "in:#",
            "-in:C1",
            "before:+024-01-01",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("   ").unwrap_err(), QueryError::Empty);
        assert_eq!(parse("*** !!").unwrap_err(), QueryError::Empty);
        assert!(parse(&"a".repeat(1001)).is_err());
        assert!(parse(&"a".repeat(1000)).is_ok());
        // An unknown operator is text.
        assert_eq!(parse("foo:bar").unwrap().include[0].words, ["foo", "bar"]);
    }

    // File search takes the same language but refuses the operators that describe
    // messages.
    #[test]
    fn files() {
        let p = parse_files("report from:me in:#general after:2024-01-01 -draft").unwrap();
        assert_eq!(p.include[0].words, ["report"]);
        assert_eq!(p.authors, [UserRef::Me]);
        assert_eq!(
            parse_files("x has:file"),
            Err(QueryError::NotForFiles("has"))
        );
        assert_eq!(
            parse_files("x is:thread"),
            Err(QueryError::NotForFiles("is"))
        );
        assert_eq!(parse_files(" "), Err(QueryError::Empty));
    }
}
