//! People search (`API.md` §12): members with a word of their name, or their email,
//! starting with each word of the query, folded for case and accents as message words are.

use crate::text::{fold, words};

/// The query's words, folded.
pub fn query_words(q: &str) -> Vec<String> {
    q.split_whitespace().map(fold).collect()
}

/// Whether a member matches every word of the query.
pub fn matches(query: &[String], name: &str, email: &str) -> bool {
    let name_words: Vec<String> = words(name).into_iter().map(|p| p.term).collect();
    let email = fold(email);
    query.iter().all(|w| {
        email.starts_with(w.as_str()) || name_words.iter().any(|n| n.starts_with(w.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each word must start a name word or the email; case and accents do not matter.
    #[test]
    fn prefixes_of_name_words_or_email() {
        let m = |q: &str| {
            matches(
                &query_words(q),
                "Zoë O'Brien-Smith",
                "zoe.obrien@example.com",
            )
        };
        assert!(m("zo"));
        assert!(m("ZOE smi"));
        assert!(m("brien"));
        assert!(m("zoe.ob"));
        assert!(m(""));
        assert!(!m("example"));
        assert!(!m("zoe xavier"));
    }
}
