//! The generated message corpus of the `search` benchmark, and its query mix.
//!
//! Every message is a function of the seed and its index, so Chorus and PostgreSQL get the
//! same texts without keeping them, and a run repeats exactly. Words come from a
//! vocabulary of [`VOCABULARY`] real-looking words (a hundred common English words first,
//! then words made of English-like syllables) drawn with Zipf frequencies (rank `r` has
//! weight `1 / (r + 2.7)`, Zipf–Mandelbrot), so a few words are in most messages and most
//! words in few. One message in ten also holds a two-word phrase from [`PHRASES`].
//! Channels and authors are uniform.

use std::collections::HashSet;

/// Words in the vocabulary.
pub const VOCABULARY: usize = 30_000;
/// Words per message: from `WORDS_MIN` to `WORDS_MIN + WORDS_SPREAD - 1`.
const WORDS_MIN: u64 = 4;
const WORDS_SPREAD: u64 = 20;
/// One message in this many holds a phrase.
const PHRASE_EVERY: u64 = 10;
/// The Zipf–Mandelbrot offset of the ranks.
const ZIPF_OFFSET: f64 = 2.7;

/// The most frequent words, in order: real English, so that the head of the distribution
/// looks like chat.
const COMMON: &[&str] = &[
    "the", "to", "and", "a", "i", "it", "is", "that", "we", "you", "for", "on", "this", "in", "of",
    "be", "have", "with", "can", "not", "just", "but", "so", "do", "was", "are", "at", "if",
    "will", "what", "me", "my", "there", "up", "from", "now", "out", "all", "think", "get", "know",
    "one", "about", "like", "going", "should", "then", "yes", "no", "good", "would", "see", "time",
    "today", "need", "make", "new", "they", "some", "work", "also", "build", "release", "test",
    "merge", "deploy", "review", "fix", "issue", "change", "meeting", "team", "update", "check",
    "thanks", "looks", "please", "could", "still", "why", "how", "when", "where", "which", "more",
    "back", "after", "before", "again", "tomorrow", "morning", "branch", "server", "client",
    "error", "logs", "config", "data", "query", "index",
];

/// Two-word phrases, one of which one message in [`PHRASE_EVERY`] holds.
pub const PHRASES: &[&str] = &[
    "merge conflict",
    "release train",
    "code review",
    "load balancer",
    "pull request",
    "on call",
    "stand up",
    "root cause",
    "feature flag",
    "rate limit",
    "disk full",
    "hot fix",
    "cache miss",
    "race condition",
    "memory leak",
    "design doc",
    "unit tests",
    "dead lock",
    "build broken",
    "happy path",
];

const ONSETS: &[&str] = &[
    "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br",
    "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr", "ch", "sp", "sl",
];
const VOWELS: &[&str] = &[
    "a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "ie", "y",
];
const CODAS: &[&str] = &[
    "", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck", "ng", "rt", "x", "th",
];

/// The SplitMix64 generator: seeded per message, so any message is made alone.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` and `stream`.
    pub fn new(seed: u64, stream: u64) -> Rng {
        Rng(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A float in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One message of the corpus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The channel, by index.
    pub channel: usize,
    /// The author, by index.
    pub author: usize,
    /// The text: lowercase ASCII words separated by single spaces.
    pub text: String,
}

/// The vocabulary and its Zipf distribution.
#[derive(Clone, Debug)]
pub struct Corpus {
    seed: u64,
    channels: usize,
    authors: usize,
    words: Vec<String>,
    /// The cumulative distribution over the ranks, ending at 1.
    cdf: Vec<f64>,
}

impl Corpus {
    /// The corpus of `seed` over `channels` channels and `authors` authors.
    pub fn new(seed: u64, channels: usize, authors: usize) -> Corpus {
        assert!(
            channels > 0 && authors > 0,
            "a corpus needs somewhere to post"
        );
        let words = vocabulary(seed);
        let weights: Vec<f64> = (0..words.len())
            .map(|r| 1.0 / (r as f64 + ZIPF_OFFSET))
            .collect();
        let sum: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / sum;
                acc
            })
            .collect();
        *cdf.last_mut().expect("a vocabulary") = 1.0;
        Corpus {
            seed,
            channels,
            authors,
            words,
            cdf,
        }
    }

    /// The word of rank `r` (0 is the most frequent).
    pub fn word(&self, r: usize) -> &str {
        &self.words[r]
    }

    /// A word drawn with the Zipf frequencies.
    fn draw(&self, rng: &mut Rng) -> &str {
        let u = rng.unit();
        let r = self
            .cdf
            .partition_point(|&c| c < u)
            .min(self.words.len() - 1);
        &self.words[r]
    }

    /// Message `i`.
    pub fn message(&self, i: u64) -> Message {
        let mut rng = Rng::new(self.seed, i);
        let channel = rng.below(self.channels as u64) as usize;
        let author = rng.below(self.authors as u64) as usize;
        let n = WORDS_MIN + rng.below(WORDS_SPREAD);
        let phrase_at = (rng.below(PHRASE_EVERY) == 0).then(|| rng.below(n));
        let mut text = String::with_capacity(n as usize * 7);
        for w in 0..n {
            if !text.is_empty() {
                text.push(' ');
            }
            if phrase_at == Some(w) {
                text.push_str(PHRASES[rng.below(PHRASES.len() as u64) as usize]);
            } else {
                text.push_str(self.draw(&mut rng));
            }
        }
        Message {
            channel,
            author,
            text,
        }
    }
}

/// [`COMMON`], then distinct syllable words, [`VOCABULARY`] in all, in a seeded order.
fn vocabulary(seed: u64) -> Vec<String> {
    let mut seen: HashSet<String> = COMMON.iter().map(|w| w.to_string()).collect();
    seen.extend(PHRASES.iter().flat_map(|p| p.split(' ').map(str::to_owned)));
    let mut words: Vec<String> = COMMON.iter().map(|w| w.to_string()).collect();
    let mut rng = Rng::new(seed, u64::MAX);
    let pick = |rng: &mut Rng, set: &[&str]| set[rng.below(set.len() as u64) as usize].to_owned();
    while words.len() < VOCABULARY {
        let syllables = 1 + rng.below(3);
        let mut w = String::new();
        for _ in 0..syllables {
            w.push_str(&pick(&mut rng, ONSETS));
            w.push_str(&pick(&mut rng, VOWELS));
            w.push_str(&pick(&mut rng, CODAS));
        }
        if w.len() >= 3 && seen.insert(w.clone()) {
            words.push(w);
        }
    }
    words
}

/// What a query asks for, on both systems: its text and its filters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// One or two words, or a two-word phrase.
    pub text: String,
    /// Whether `text` is a phrase.
    pub phrase: bool,
    /// `from:` this author.
    pub author: Option<usize>,
    /// `in:` this channel.
    pub channel: Option<usize>,
    /// `after:` this day (`YYYY-MM-DD`, exclusive).
    pub after: Option<String>,
}

/// The kinds of the mix, in turn.
const QUERY_KINDS: u64 = 8;
/// Rank ranges of common, middling and rare words.
const COMMON_RANKS: (usize, usize) = (20, 200);
const MIDDLE_RANKS: (usize, usize) = (200, 3_000);
const RARE_RANKS: (usize, usize) = (3_000, VOCABULARY);

impl Corpus {
    /// `count` queries of the mix: a common word, a middling word, two words, a rare word,
    /// a phrase, a word `from:` an author, a word `in:` a channel, a word `after:` the day
    /// `after_day` (the day before the messages were posted, so every message is after it).
    pub fn queries(&self, count: usize, seed: u64, after_day: &str) -> Vec<Query> {
        let mut rng = Rng::new(seed, 0x9e7);
        let ranked = |rng: &mut Rng, (lo, hi): (usize, usize)| {
            self.word(lo + rng.below((hi - lo) as u64) as usize)
                .to_owned()
        };
        (0..count as u64)
            .map(|i| {
                let mut q = Query {
                    text: String::new(),
                    phrase: false,
                    author: None,
                    channel: None,
                    after: None,
                };
                match i % QUERY_KINDS {
                    0 => q.text = ranked(&mut rng, COMMON_RANKS),
                    1 => q.text = ranked(&mut rng, MIDDLE_RANKS),
                    2 => {
                        let a = ranked(&mut rng, COMMON_RANKS);
                        q.text = format!("{a} {}", ranked(&mut rng, MIDDLE_RANKS));
                    }
                    3 => q.text = ranked(&mut rng, RARE_RANKS),
                    4 => {
                        q.text = PHRASES[rng.below(PHRASES.len() as u64) as usize].to_owned();
                        q.phrase = true;
                    }
                    5 => {
                        q.text = ranked(&mut rng, COMMON_RANKS);
                        q.author = Some(rng.below(self.authors as u64) as usize);
                    }
                    6 => {
                        q.text = ranked(&mut rng, MIDDLE_RANKS);
                        q.channel = Some(rng.below(self.channels as u64) as usize);
                    }
                    _ => {
                        q.text = ranked(&mut rng, COMMON_RANKS);
                        q.after = Some(after_day.to_owned());
                    }
                }
                q
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A message depends only on the seed and its index, and the vocabulary is distinct
    // lowercase ASCII words, with the common words most frequent.
    #[test]
    fn deterministic_zipf_corpus() {
        let a = Corpus::new(7, 5, 3);
        let b = Corpus::new(7, 5, 3);
        assert_eq!(a.message(123), b.message(123));
        assert_ne!(a.message(123), a.message(124));
        let words: HashSet<&String> = a.words.iter().collect();
        assert_eq!(words.len(), VOCABULARY);
        assert!(a
            .words
            .iter()
            .all(|w| w.bytes().all(|c| c.is_ascii_lowercase())));
        let mut the = 0;
        let mut phrases = 0;
        for i in 0..2_000 {
            let m = a.message(i);
            assert!(m.channel < 5 && m.author < 3);
            the += usize::from(m.text.split(' ').any(|w| w == "the"));
            phrases += usize::from(PHRASES.iter().any(|p| m.text.contains(p)));
        }
        assert!(the > 400, "the commonest word is in many messages: {the}");
        assert!((100..400).contains(&phrases), "{phrases}");
    }

    // The mix cycles through its eight kinds, each with its own filter.
    #[test]
    fn query_mix() {
        let c = Corpus::new(1, 4, 4);
        let q = c.queries(16, 9, "2026-01-01");
        assert!(q[4].phrase && q[12].phrase);
        assert!(q[5].author.is_some() && q[6].channel.is_some());
        assert_eq!(q[7].after.as_deref(), Some("2026-01-01"));
        assert_eq!(q[2].text.split(' ').count(), 2);
        assert_eq!(q, c.queries(16, 9, "2026-01-01"));
    }
}
