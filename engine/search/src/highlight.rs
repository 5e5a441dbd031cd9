//! Where a query matched a message's text: `[start, end)` in Unicode scalar values, as
//! `API.md` §12 gives them.
//!
//! Computed here from the query and the text with the same tokenizers as the index, not
//! by tantivy's `SnippetGenerator`, which does not mark matches one edit away: a word
//! matches a query word when it is equal, one edit away (query words of 5+ letters), or
//! starts with a prefix; a phrase marks its run of consecutive words; a CJK run marks every
//! place it occurs. Excluded items match nothing that is shown, so they mark nothing.
//!
//! A file's `highlights` mark its name the same way; its text is shown as a [`Snippet`],
//! a window of the text around the first match with its own highlights. Finding the first
//! match reads at most [`SNIPPET_SCAN_BYTES_MAX`] of the text, so a page of results costs
//! a bounded amount of work however large the files: a file that matched further in has
//! no snippet.

use crate::query::{Match, Parsed};
use crate::text::{is_cjk, letters, within_one_edit, words, Piece};
use serde::Serialize;

/// How far into a file's text a snippet is looked for, in bytes.
pub const SNIPPET_SCAN_BYTES_MAX: usize = 256 * 1024;
/// The length of a snippet, in characters (a little more when a match runs past it).
pub const SNIPPET_CHARS: usize = 200;
/// How much of the text before the first match a snippet shows, in characters.
pub const SNIPPET_LEAD_CHARS: usize = 60;
/// The text is searched for the first match in pieces of about this many bytes, cut at
/// whitespace, so the search stops soon after it.
const SCAN_PIECE_BYTES: usize = 16 * 1024;

/// A window of a file's text around the first place a query matched it. Runs of
/// whitespace are one space in `text`, and `highlights` are `[start, end)` in Unicode
/// scalar values into `text`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snippet {
    /// The window of text.
    pub text: String,
    /// Where the query matched it.
    pub highlights: Vec<[usize; 2]>,
}

/// The highlights of `text` for `parsed`, sorted and merged where they overlap or touch.
pub fn highlights(parsed: &Parsed, text: &str) -> Vec<[usize; 2]> {
    let mut chars = CharOffsets::new(text);
    byte_spans(parsed, text)
        .into_iter()
        .map(|(s, e)| [chars.of(s), chars.of(e)])
        .collect()
}

/// The snippet of `text` for `parsed`; `None` when no included item matches its first
/// [`SNIPPET_SCAN_BYTES_MAX`] bytes.
pub fn snippet(parsed: &Parsed, text: &str) -> Option<Snippet> {
    let scan = &text[..floor_boundary(text, SNIPPET_SCAN_BYTES_MAX)];
    let (first_start, first_end) = first_match(parsed, scan)?;
    // Start up to SNIPPET_LEAD_CHARS before the match, at a word's start when there is
    // whitespace to start after.
    let lead: usize = scan[..first_start]
        .chars()
        .rev()
        .take(SNIPPET_LEAD_CHARS)
        .map(char::len_utf8)
        .sum();
    let mut start = first_start - lead;
    if start > 0 {
        if let Some(ws) = scan[start..first_start].find(char::is_whitespace) {
            start += ws;
        }
    }
    // End SNIPPET_CHARS later, or at the match's end if that is further, then at the
    // last whitespace before that when there is one after the match.
    let span: usize = text[start..]
        .chars()
        .take(SNIPPET_CHARS)
        .map(char::len_utf8)
        .sum();
    let mut end = (start + span).max(first_end);
    if end < text.len() {
        if let Some(ws) = text[first_end..end].rfind(char::is_whitespace) {
            end = first_end + ws;
        }
    }
    let window: String = text[start..end]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let highlights = highlights(parsed, &window);
    Some(Snippet {
        text: window,
        highlights,
    })
}

/// The byte span of the first match in `text`, looked for piece by piece.
fn first_match(parsed: &Parsed, text: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    while from < text.len() {
        let mut to = floor_boundary(text, from + SCAN_PIECE_BYTES);
        if to < text.len() {
            // Cut at whitespace, so no word is split between two pieces.
            to = text[to..]
                .find(char::is_whitespace)
                .map_or(text.len(), |i| to + i);
        }
        if let Some((s, e)) = byte_spans(parsed, &text[from..to]).first() {
            return Some((from + s, from + e));
        }
        from = to;
    }
    None
}

/// The largest character boundary of `text` at or below `at`.
fn floor_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The byte spans of `text` the query matched, sorted and merged.
fn byte_spans(parsed: &Parsed, text: &str) -> Vec<(usize, usize)> {
    let pieces = words(text);
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for m in &parsed.include {
        word_spans(m, &pieces, &mut spans);
        for run in &m.cjk {
            cjk_spans(run, text, &mut spans);
        }
    }
    spans.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

fn word_spans(m: &Match, pieces: &[Piece], out: &mut Vec<(usize, usize)>) {
    let n = m.words.len();
    if n == 0 || pieces.len() < n {
        return;
    }
    for start in 0..=pieces.len() - n {
        let window = &pieces[start..start + n];
        let hit = window.iter().zip(&m.words).enumerate().all(|(i, (p, w))| {
            if m.prefix && i == n - 1 {
                p.term.starts_with(w.as_str())
            } else if n == 1 && m.fuzzy() {
                p.term == *w
                    || (letters(w) >= crate::query::FUZZY_LETTERS_MIN
                        && within_one_edit(&p.term, w))
            } else {
                p.term == *w
            }
        });
        if hit {
            out.push((window[0].start, window[n - 1].end));
        }
    }
}

fn cjk_spans(run: &str, text: &str, out: &mut Vec<(usize, usize)>) {
    debug_assert!(run.chars().all(is_cjk));
    let mut from = 0;
    while let Some(i) = text[from..].find(run) {
        let s = from + i;
        out.push((s, s + run.len()));
        from = s + run.chars().next().map_or(1, char::len_utf8);
    }
}

/// Byte offsets to scalar-value offsets, for offsets asked in increasing order.
struct CharOffsets<'a> {
    text: &'a str,
    byte: usize,
    chars: usize,
}

impl<'a> CharOffsets<'a> {
    fn new(text: &'a str) -> CharOffsets<'a> {
        CharOffsets {
            text,
            byte: 0,
            chars: 0,
        }
    }

    fn of(&mut self, byte: usize) -> usize {
        if byte < self.byte {
            *self = CharOffsets::new(self.text);
        }
        self.chars += self.text[self.byte..byte].chars().count();
        self.byte = byte;
        self.chars
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::parse;

    fn hl(q: &str, text: &str) -> Vec<[usize; 2]> {
        highlights(&parse(q).unwrap(), text)
    }

    // Exact, folded, fuzzy, prefix, phrase and CJK matches are marked in scalar values.
    #[test]
    fn marks() {
        assert_eq!(hl("cafe", "Le Café é cafe"), [[3, 7], [10, 14]]);
        // "ésearch" folds to "esearch", one insertion away.
        assert_eq!(hl("search", "ésearch serch"), [[0, 7], [8, 13]]);
        assert_eq!(hl("dep*", "the deploy deployed dap"), [[4, 10], [11, 19]]);
        assert_eq!(hl("\"build failed\"", "build failed, build ok"), [[0, 12]]);
        assert_eq!(hl("東京", "我在東京。東京!"), [[2, 4], [5, 7]]);
        assert_eq!(hl("cats -dogs", "cats dogs"), [[0, 4]]);
        assert_eq!(hl("from:me", "anything"), Vec::<[usize; 2]>::new());
        // Short words are exact only.
        assert_eq!(hl("cat", "cut cat"), [[4, 7]]);
        // Overlapping marks merge.
        assert_eq!(hl("\"a b\" b", "a b"), [[0, 3]]);
    }

    // A snippet is a window around the first match, whitespace folded, its highlights
    // into the window; a match beyond the scanned part, or none, gives no snippet.
    #[test]
    fn snippets() {
        let p = parse("revenue").unwrap();
        let s = snippet(&p, "Q3 report\n\nRevenue  grew 12%.").unwrap();
        assert_eq!(s.text, "Q3 report Revenue grew 12%.");
        assert_eq!(s.highlights, [[10, 17]]);
        let text = format!("{}needle {}", "é ".repeat(5_000), "tail ".repeat(100));
        let s = snippet(&parse("needle").unwrap(), &text).unwrap();
        assert!(s.text.starts_with("é é"), "{}", s.text);
        let at = s.text.find("needle").unwrap();
        let start = s.text[..at].chars().count();
        assert_eq!(s.highlights, [[start, start + 6]]);
        assert!(s.text.chars().count() <= SNIPPET_CHARS, "{}", s.text);
        assert!(start <= SNIPPET_LEAD_CHARS);
        assert_eq!(snippet(&parse("absent").unwrap(), &text), None);
        let far = format!("{}needle", "x ".repeat(SNIPPET_SCAN_BYTES_MAX));
        assert_eq!(snippet(&parse("needle").unwrap(), &far), None);
        // A match past one scan piece is found.
        let later = format!("{}needle", "word ".repeat(10_000));
        assert!(snippet(&parse("needle").unwrap(), &later).is_some());
    }
}
