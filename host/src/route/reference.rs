//! Test-only: an obviously correct model of RabbitMQ topic matching, and generators
//! of the keys and patterns the property tests feed to it and to the real thing.

use proptest::prelude::*;

/// RabbitMQ's `split_topic_key`: the empty string is no words; otherwise split on `.`.
pub(crate) fn words(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('.').collect()
    }
}

/// Does `pattern` match `routing_key`? Straight from the definition, recursively
/// (exponential in the worst case, which is fine for six words).
pub(crate) fn matches(pattern: &str, routing_key: &str) -> bool {
    match_words(&words(pattern), &words(routing_key))
}

fn match_words(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        // `#`: swallow 0, 1, … or all the remaining words.
        Some((&"#", rest)) => (0..=key.len()).any(|n| match_words(rest, &key[n..])),
        // `*`: swallow exactly one word.
        Some((&"*", rest)) => !key.is_empty() && match_words(rest, &key[1..]),
        // Anything else, `a*` and `#b` included, must equal the key's word.
        Some((literal, rest)) => key.first() == Some(literal) && match_words(rest, &key[1..]),
    }
}

/// Joins 0–6 words drawn from `alphabet` with `.`.
fn dotted(alphabet: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(alphabet), 0..=6).prop_map(|w| w.join("."))
}

/// Routing keys: empty words (often, as they are where the edge cases are), short
/// words, words that contain wildcard characters,
/// and (rarely in practice, but legal) words that are exactly `*` or `#`.
pub(crate) fn routing_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => dotted(&["", "a", "b", "ab"]),
        1 => dotted(&["", "a"]),
        1 => dotted(&["", "a", "b", "ab", "a*", "#b", "*", "#"]),
    ]
}

/// Binding patterns: the same words plus the wildcards `*` and `#`, weighted so that
/// runs of `#` and mixes of `*` and `#` are common.
pub(crate) fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => dotted(&["", "a", "b", "ab", "*", "#"]),
        2 => dotted(&["a", "*", "#", "#"]),
        1 => dotted(&["", "a", "*", "#"]),
        1 => dotted(&["", "a", "b", "ab", "*", "#", "a*", "#b"]),
    ]
}
