//! How text becomes terms, for indexing, for queries and for highlights alike: one set of
//! pure functions, so that what the index holds and what a query asks for are made the
//! same way.
//!
//! - **Words** are runs of letters and digits outside the CJK scripts, folded: lowercased,
//!   decomposed (NFKD) and stripped of combining marks, so `Café`, `CAFE` and `café` are
//!   one term.
//! - **CJK** (Han, Hiragana, Katakana, Hangul) has no spaces between words, so each run of
//!   CJK characters is indexed as its overlapping character bigrams in a field of its own
//!   (`東京都` → `東京`, `京都`), at consecutive positions. A query's run of 2 or more such
//!   characters is then a phrase of its bigrams, which matches exactly the texts holding
//!   that run. A run of one character is indexed as that character alone.

use tantivy::tokenizer::{Token, TokenStream, Tokenizer};
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// A term and where it came from, in bytes of the original text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The folded term.
    pub term: String,
    /// Byte offset of its first character in the text.
    pub start: usize,
    /// Byte offset just past its last character.
    pub end: usize,
}

/// Whether `c` belongs to a script written without spaces between words: CJK ideographs
/// (with their extensions and compatibility forms), Hiragana, Katakana (full and half
/// width) and Hangul.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x1100..=0x11FF        // Hangul Jamo
        | 0x3040..=0x309F      // Hiragana
        | 0x30A0..=0x30FF      // Katakana
        | 0x3130..=0x318F      // Hangul compatibility Jamo
        | 0x31F0..=0x31FF      // Katakana phonetic extensions
        | 0x3400..=0x4DBF      // CJK extension A
        | 0x4E00..=0x9FFF      // CJK unified ideographs
        | 0xAC00..=0xD7AF      // Hangul syllables
        | 0xF900..=0xFAFF      // CJK compatibility ideographs
        | 0xFF66..=0xFF9F      // half-width Katakana
        | 0x20000..=0x2FA1F) // CJK extensions B and later, compatibility supplement
}

fn is_word_char(c: char) -> bool {
    // No ASCII character is CJK: the cheap test answers for most characters of most texts.
    if c.is_ascii() {
        c.is_ascii_alphanumeric()
    } else {
        c.is_alphanumeric() && !is_cjk(c)
    }
}

/// Folds a word for case and accents: lowercase, NFKD, combining marks removed.
pub fn fold(word: &str) -> String {
    // ASCII decomposes to itself and has no combining marks, so its fold is its lowercase.
    if word.is_ascii() {
        word.to_ascii_lowercase()
    } else {
        fold_unicode(word)
    }
}

/// [`fold`] without the ASCII shortcut.
fn fold_unicode(word: &str) -> String {
    word.nfkd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

/// The folded words of `text`, in order.
pub fn words(text: &str) -> Vec<Piece> {
    runs(text, is_word_char)
        .into_iter()
        .filter_map(|(start, end)| {
            let term = fold(&text[start..end]);
            // A word made only of marks folds to nothing; it is no term.
            (!term.is_empty()).then_some(Piece { term, start, end })
        })
        .collect()
}

/// The CJK terms of `text`: each run's overlapping character bigrams, or the character
/// itself for a run of one.
pub fn cjk_terms(text: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    if text.is_ascii() {
        return out;
    }
    for (start, end) in runs(text, is_cjk) {
        let chars: Vec<(usize, char)> = text[start..end]
            .char_indices()
            .map(|(i, c)| (start + i, c))
            .collect();
        if chars.len() == 1 {
            out.push(Piece {
                term: chars[0].1.to_string(),
                start,
                end,
            });
            continue;
        }
        for pair in chars.windows(2) {
            let (i, a) = pair[0];
            let (j, b) = pair[1];
            out.push(Piece {
                term: [a, b].iter().collect(),
                start: i,
                end: j + b.len_utf8(),
            });
        }
    }
    out
}

/// The byte ranges of the maximal runs of characters for which `keep` holds.
fn runs(text: &str, keep: fn(char) -> bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut open: Option<usize> = None;
    for (i, c) in text.char_indices() {
        match (keep(c), open) {
            (true, None) => open = Some(i),
            (false, Some(s)) => {
                out.push((s, i));
                open = None;
            }
            _ => {}
        }
    }
    if let Some(s) = open {
        out.push((s, text.len()));
    }
    out
}

/// The number of characters of a folded term (what "a word of 5 or more letters" counts).
pub fn letters(term: &str) -> usize {
    term.chars().count()
}

/// Whether `a` and `b` are at most one edit apart: one insertion, deletion, substitution,
/// or swap of two adjacent characters.
pub fn within_one_edit(a: &str, b: &str) -> bool {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let (short, long) = if a.len() <= b.len() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    match long.len() - short.len() {
        0 => {
            let diffs: Vec<usize> = (0..short.len()).filter(|&i| short[i] != long[i]).collect();
            match diffs.as_slice() {
                [] | [_] => true,
                [i, j] => *j == i + 1 && short[*i] == long[*j] && short[*j] == long[*i],
                _ => false,
            }
        }
        1 => {
            let first = (0..short.len())
                .find(|&i| short[i] != long[i])
                .unwrap_or(short.len());
            short[first..] == long[first + 1..]
        }
        _ => false,
    }
}

/// The tantivy tokenizer of the word field: [`words`].
#[derive(Clone, Default)]
pub struct WordTokenizer;

/// The tantivy tokenizer of the CJK field: [`cjk_terms`].
#[derive(Clone, Default)]
pub struct CjkTokenizer;

/// Tokens computed up front from [`Piece`]s.
pub struct PieceStream {
    tokens: Vec<Token>,
    next: usize,
}

impl PieceStream {
    fn new(pieces: Vec<Piece>) -> PieceStream {
        let tokens = pieces
            .into_iter()
            .enumerate()
            .map(|(position, p)| Token {
                offset_from: p.start,
                offset_to: p.end,
                position,
                text: p.term,
                position_length: 1,
            })
            .collect();
        PieceStream { tokens, next: 0 }
    }
}

impl TokenStream for PieceStream {
    fn advance(&mut self) -> bool {
        self.next += 1;
        self.next <= self.tokens.len()
    }

    fn token(&self) -> &Token {
        &self.tokens[self.next - 1]
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.tokens[self.next - 1]
    }
}

impl Tokenizer for WordTokenizer {
    type TokenStream<'a> = PieceStream;
    fn token_stream<'a>(&'a mut self, text: &'a str) -> PieceStream {
        PieceStream::new(words(text))
    }
}

impl Tokenizer for CjkTokenizer {
    type TokenStream<'a> = PieceStream;
    fn token_stream<'a>(&'a mut self, text: &'a str) -> PieceStream {
        PieceStream::new(cjk_terms(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(p: Vec<Piece>) -> Vec<String> {
        p.into_iter().map(|p| p.term).collect()
    }

    // Words fold case and accents, split on punctuation, and leave CJK to the other field.
    #[test]
    fn words_fold_and_split() {
        assert_eq!(
            terms(words("Café CRÈME, naïve-Ünïcode! 東京 x2")),
            ["cafe", "creme", "naive", "unicode", "x2"]
        );
        let w = words("é b");
        assert_eq!((w[0].start, w[0].end), (0, 2));
    }

    // CJK runs become overlapping bigrams with their byte ranges; a lone character stays.
    #[test]
    fn cjk_bigrams() {
        assert_eq!(
            terms(cjk_terms("東京都 と abc 한국어")),
            ["東京", "京都", "と", "한국", "국어"]
        );
        let t = cjk_terms("a東京");
        assert_eq!((t[0].start, t[0].end), (1, 7));
    }

    // The ASCII shortcuts answer as the general paths do: every ASCII character on its
    // own, and words mixing cases and digits.
    #[test]
    fn ascii_shortcuts_agree_with_the_general_path() {
        for b in 0u8..128 {
            let c = b as char;
            assert_eq!(is_word_char(c), c.is_alphanumeric() && !is_cjk(c), "{b}");
            let s = c.to_string();
            assert_eq!(fold(&s), fold_unicode(&s), "{b}");
            assert!(cjk_terms(&s).is_empty());
        }
        for w in ["Hello", "WORLD42", "x2Y", "", "MiXeD_case-Words!"] {
            assert_eq!(fold(w), fold_unicode(w), "{w}");
        }
        // A text with one non-ASCII character still takes the general path throughout.
        assert_eq!(terms(cjk_terms("Tokyo 東京")), ["東京"]);
        assert_eq!(terms(words("ÉCOLE Hello")), ["ecole", "hello"]);
    }

    // One edit is an insertion, deletion, substitution or adjacent swap; two are not.
    #[test]
    fn one_edit() {
        for (a, b) in [
            ("search", "serch"),
            ("search", "searchh"),
            ("search", "seerch"),
            ("search", "saerch"),
            ("search", "search"),
        ] {
            assert!(within_one_edit(a, b), "{a} {b}");
        }
        for (a, b) in [
            ("search", "sarch1"),
            ("search", "sea"),
            ("search", "esarhc"),
            ("abcde", "badce"),
        ] {
            assert!(!within_one_edit(a, b), "{a} {b}");
        }
    }
}
