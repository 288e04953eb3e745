//! One topic binding pattern, compiled once and matched against routing keys without
//! allocating.
//!
//! The semantics are RabbitMQ's (`rabbit_db_topic_exchange`), which is what the
//! AMQP topic exchange means in practice:
//!
//! - Keys and patterns are split into words on `.`; words may be empty, so `a..b` is
//!   three words and `a.` is two (`"a"` and `""`).
//! - The empty string is **zero** words, not one empty word: RabbitMQ's
//!   `split_topic_key(<<>>)` returns `[]`. So `#`, `#.#` and the empty pattern match
//!   the empty routing key, and `*`, `*.#` and `#.*` do not (RabbitMQ's own
//!   topic-matching suite expects exactly this; see the tests).
//! - A pattern word that is exactly `*` matches exactly one word; exactly `#` matches
//!   zero or more words.
//! - Any other word is literal, even one that contains `*` or `#` among other
//!   characters (`a*`, `#b`): RabbitMQ's trie only follows `*` and `#` edges for the
//!   whole words `"*"` and `"#"`, so `a*` matches only the word `a*`.
//!
//! Matching compares the pattern's literal words at either end (`payment.card` in
//! `payment.card.*`, `failed` in `#.failed`) with the key's bytes first, which rejects
//! most keys at the cost of a `memcmp`, then matches the words in between with the
//! two-pointer wildcard algorithm (`*` plays the part of `?` and `#` of `*` in a file
//! glob): at most pattern words × key words steps, never exponential however many
//! `#`s there are, and no allocation.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

/// The longest pattern AMQP can carry: binding keys are short strings (255 bytes).
pub const MAX_PATTERN_LEN: usize = 255;

/// Why a binding pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Longer than an AMQP short string, so RabbitMQ could never be given it.
    #[error(
        "binding pattern {pattern:?} is {len} bytes long; AMQP allows at most {MAX_PATTERN_LEN}"
    )]
    TooLong {
        /// The pattern as given.
        pattern: String,
        /// Its length in bytes.
        len: usize,
    },
}

/// One word of a compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    /// Matches exactly this word.
    Literal(Box<str>),
    /// `*`: exactly one word, whatever it is.
    Star,
    /// `#`: zero or more words. Never two in a row (`#.#` compiles to one `#`).
    Hash,
}

/// A topic-exchange binding pattern such as `payment.*` or `audit.#`, compiled for
/// matching.
///
/// Equality and hashing follow the text as written, so `#.#` and `#` are different
/// patterns even though they match the same keys.
#[derive(Clone)]
pub struct TopicPattern {
    source: Box<str>,
    words: Box<[Word]>,
    /// No wildcards at all: the pattern matches only the identical string.
    exact: bool,
    /// The literal words before the first wildcard (`payment.card` in
    /// `payment.card.*`), if any: one comparison rejects most keys, and the
    /// word-by-word match starts after them.
    prefix: Option<Affix>,
    /// The literal words after the last wildcard (`failed` in `payment.#.failed`),
    /// if any: one more comparison before the word-by-word match.
    suffix: Option<Affix>,
}

/// A run of literal words at one end of a pattern.
#[derive(Debug, Clone, Copy)]
struct Affix {
    /// How many words.
    words: usize,
    /// Their length in bytes, with the dots between them.
    bytes: usize,
}

impl Affix {
    /// The literal words `words` starts with, if any.
    fn of<'a>(words: impl Iterator<Item = &'a Word>) -> Option<Self> {
        let (count, letters) = words
            .map_while(|w| match w {
                Word::Literal(literal) => Some(literal.len()),
                Word::Star | Word::Hash => None,
            })
            .fold((0, 0), |(count, letters), len| (count + 1, letters + len));
        (count > 0).then(|| Self {
            words: count,
            bytes: letters + count - 1,
        })
    }
}

impl TopicPattern {
    /// Compiles `pattern`. Every string up to 255 bytes is a valid pattern, as in
    /// RabbitMQ.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(PatternError::TooLong {
                pattern: pattern.to_owned(),
                len: pattern.len(),
            });
        }
        let mut words = Vec::new();
        for word in split_words(pattern) {
            let word = match word {
                "*" => Word::Star,
                "#" => Word::Hash,
                literal => Word::Literal(literal.into()),
            };
            // `#.#` matches exactly what `#` matches; collapsing keeps one resume
            // point per run of `#`s.
            if word == Word::Hash && words.last() == Some(&Word::Hash) {
                continue;
            }
            words.push(word);
        }
        let exact = words.iter().all(|w| matches!(w, Word::Literal(_)));
        Ok(Self {
            source: pattern.into(),
            prefix: Affix::of(words.iter()),
            suffix: Affix::of(words.iter().rev()),
            words: words.into_boxed_slice(),
            exact,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether a message published with `routing_key` is delivered through a binding
    /// with this pattern.
    pub fn matches(&self, routing_key: &str) -> bool {
        if self.exact {
            // Splitting on `.` loses nothing, so literal words match exactly when
            // the strings are equal.
            return *self.source == *routing_key;
        }
        if routing_key.is_empty() {
            // No words: only `#` (or nothing) matches.
            return self.words.iter().all(|w| *w == Word::Hash);
        }
        let key = routing_key.as_bytes();
        let source = self.source.as_bytes();
        // The key's words between the literal ends: from byte `lo` up to, not
        // including, byte `hi_plus_one - 1` (a dot, or one past the end of the key).
        let (mut lo, mut hi_plus_one) = (0, key.len() + 1);
        // The pattern's words between its literal ends.
        let (mut first, mut last) = (0, self.words.len());
        if let Some(prefix) = self.prefix {
            // The key's first words must be these literals: the same bytes, then the
            // end of the key or a dot.
            let end = prefix.bytes;
            if key.get(..end) != source.get(..end) || !matches!(key.get(end), None | Some(b'.')) {
                return false;
            }
            lo = end + 1;
            first = prefix.words;
        }
        if let Some(suffix) = self.suffix {
            // The key's last words must be these literals: the same bytes, with the
            // start of the key or a dot before them.
            let (Some(start), Some(from)) = (
                key.len().checked_sub(suffix.bytes),
                source.len().checked_sub(suffix.bytes),
            ) else {
                return false;
            };
            let at_word_start = start == 0 || key.get(start - 1) == Some(&b'.');
            if !at_word_start || key.get(start..) != source.get(from..) {
                return false;
            }
            hi_plus_one = start;
            last -= suffix.words;
        }
        let middle = match lo.cmp(&hi_plus_one) {
            // The prefix and suffix would overlap: the key has too few words.
            Ordering::Greater => return false,
            // They meet: no words between them.
            Ordering::Equal => None,
            // At least one word, perhaps an empty one (`.` is ASCII, so both ends are
            // character boundaries).
            Ordering::Less => routing_key.get(lo..hi_plus_one - 1),
        };
        self.words
            .get(first..last)
            .is_some_and(|pattern| glob(pattern, Words { rest: middle }))
    }
}

/// Whether `pattern` matches exactly the key words `rest` yields.
///
/// The two-pointer wildcard match, with `*` as one word and `#` as any number: on a
/// mismatch, go back to just after the latest `#` and let it swallow one more word.
/// Earlier `#`s never need revisiting (whatever they swallowed, the latest `#` can
/// make up for), so this takes at most pattern words × key words steps.
fn glob(pattern: &[Word], mut rest: Words<'_>) -> bool {
    let mut current = rest.next();
    let mut at = 0;
    // Where to resume: the pattern index after the latest `#`, the first key word
    // that `#` has not swallowed, and the words after that one.
    let mut resume: Option<(usize, Option<&str>, Words<'_>)> = None;
    while let Some(word) = current {
        match pattern.get(at) {
            // A final `#` takes whatever is left.
            Some(Word::Hash) if at + 1 == pattern.len() => return true,
            Some(Word::Hash) => {
                at += 1;
                resume = Some((at, current, rest));
                continue;
            }
            Some(Word::Star) => {
                at += 1;
                current = rest.next();
                continue;
            }
            Some(Word::Literal(literal)) if **literal == *word => {
                at += 1;
                current = rest.next();
                continue;
            }
            _ => {}
        }
        let Some((after_hash, unswallowed, words_after)) = &mut resume else {
            return false;
        };
        *unswallowed = words_after.next();
        at = *after_hash;
        current = *unswallowed;
        rest = *words_after;
    }
    pattern
        .get(at..)
        .is_some_and(|left| left.iter().all(|w| *w == Word::Hash))
}

/// The words of a routing key or pattern: `""` is no words at all (as in RabbitMQ),
/// anything else is what `split('.')` yields.
fn split_words(s: &str) -> Words<'_> {
    Words {
        rest: (!s.is_empty()).then_some(s),
    }
}

/// `split('.')` without the generic searcher: words are short, so a plain byte scan
/// beats `memchr`'s setup, and cloning it (to remember where a `#` started) is a copy.
#[derive(Clone, Copy)]
struct Words<'a> {
    /// What is left to split; `None` once the last word has been returned.
    rest: Option<&'a str>,
}

impl<'a> Iterator for Words<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.rest?;
        match rest.bytes().position(|b| b == b'.') {
            Some(dot) => {
                // `.` is ASCII, so both sides of it are character boundaries.
                self.rest = rest.get(dot + 1..);
                rest.get(..dot)
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TopicPattern").field(&self.source).finish()
    }
}

impl PartialEq for TopicPattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for TopicPattern {}

impl Hash for TopicPattern {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.source.hash(state);
    }
}

impl FromStr for TopicPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::route::reference;

    fn matches(pattern: &str, key: &str) -> bool {
        TopicPattern::parse(pattern)
            .unwrap_or_else(|e| panic!("{e}"))
            .matches(key)
    }

    #[test]
    fn hash_alone_matches_every_key_including_the_empty_one() {
        for key in ["", "a", "a.b", ".", "a..b", "a.b.c.d.e.f"] {
            assert!(matches("#", key), "# vs {key:?}");
        }
    }

    #[test]
    fn hash_between_words_matches_zero_or_more_words() {
        assert!(matches("a.#.b", "a.b"));
        assert!(matches("a.#.b", "a.x.b"));
        assert!(matches("a.#.b", "a.x.y.b"));
        assert!(!matches("a.#.b", "a.b.c"));
        assert!(!matches("a.#.b", "b"));
        assert!(matches("a.#.b", "a.b.b"));
        assert!(matches("a.#", "a"));
        assert!(!matches("a.#", "b.a"));
        assert!(matches("#.b", "b"));
        assert!(matches("#.b", "a.b"));
        assert!(!matches("#.b", "b.a"));
    }

    #[test]
    fn repeated_hashes_mean_one_hash() {
        for key in ["", "a", "a.b", "."] {
            assert!(matches("#.#", key), "#.# vs {key:?}");
            assert!(matches("#.#.#", key), "#.#.# vs {key:?}");
        }
        assert_eq!(
            TopicPattern::parse("a.#.#.#.b").map(|p| p.words.len()),
            Ok(3)
        );
    }

    #[test]
    fn star_is_exactly_one_word() {
        // RabbitMQ's empty key has no words, so `*` does not match it.
        assert!(!matches("*", ""));
        assert!(matches("*", "a"));
        assert!(matches("*", "ab"));
        assert!(!matches("*", "a.b"));
        assert!(!matches("*", "."));
        assert!(matches("a.*", "a."));
        assert!(!matches("a.*", "a"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(matches("*.*", "."));
        assert!(matches("*.*", "a.b"));
        assert!(!matches("*.*", "a"));
    }

    #[test]
    fn star_and_hash_together_need_at_least_the_stars() {
        assert!(!matches("*.#", ""));
        assert!(matches("*.#", "a"));
        assert!(matches("*.#", "a.b.c"));
        assert!(!matches("#.*", ""));
        assert!(matches("#.*", "a"));
        assert!(matches("#.*", "a.b"));
        assert!(!matches("#.*.#", ""));
        assert!(matches("#.*.#", "x"));
        assert!(!matches("#.*.*", "a"));
        assert!(matches("#.*.*", "a."));
    }

    #[test]
    fn empty_words_are_words() {
        assert!(matches("a..b", "a..b"));
        assert!(!matches("a..b", "a.b"));
        assert!(!matches("a..b", "a.x.b"));
        assert!(matches("a.*.b", "a..b"));
        assert!(matches("a.#.b", "a..b"));
        assert!(matches(".", "."));
        assert!(!matches(".", ""));
        assert!(matches("#.", "a."));
        assert!(matches("#.", "."));
        assert!(!matches("#.", ""));
    }

    #[test]
    fn the_empty_pattern_matches_only_the_empty_key() {
        assert!(matches("", ""));
        assert!(!matches("", "a"));
        assert!(!matches("", "."));
    }

    #[test]
    fn words_containing_wildcards_are_literal() {
        assert!(matches("a*", "a*"));
        assert!(!matches("a*", "ab"));
        assert!(!matches("a*", "a"));
        assert!(matches("#b", "#b"));
        assert!(!matches("#b", "b"));
        assert!(!matches("#b", "a.b"));
        assert!(matches("x.**.y", "x.**.y"));
        assert!(!matches("x.**.y", "x.a.y"));
        assert!(matches("*.a#", "q.a#"));
        // A routing key word that happens to be `*` or `#` is just a word.
        assert!(matches("a.*", "a.#"));
        assert!(!matches("a.b", "a.*"));
    }

    #[test]
    fn many_hashes_do_not_backtrack_exponentially() {
        let pattern = "#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.b";
        let key = vec!["a"; 200].join(".");
        assert!(!matches(pattern, &key));
        assert!(matches(pattern, &format!("{key}.b")));
    }

    #[test]
    fn patterns_longer_than_an_amqp_short_string_are_refused() {
        let longest = "a".repeat(MAX_PATTERN_LEN);
        assert!(TopicPattern::parse(&longest).is_ok());
        let too_long = format!("{longest}.");
        let error = TopicPattern::parse(&too_long).err();
        assert_eq!(
            error,
            Some(PatternError::TooLong {
                pattern: too_long.clone(),
                len: 256
            })
        );
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains(&too_long), "{message}");
        assert!(message.contains("256 bytes"), "{message}");
    }

    #[test]
    fn text_equality_display_and_round_trip() {
        let p = TopicPattern::parse("payment.*.#").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.as_str(), "payment.*.#");
        assert_eq!(p.to_string(), "payment.*.#");
        assert_eq!(format!("{p:?}"), r#"TopicPattern("payment.*.#")"#);
        assert_eq!("payment.*.#".parse::<TopicPattern>(), Ok(p.clone()));
        assert_ne!(TopicPattern::parse("#.#"), TopicPattern::parse("#"));
    }

    /// RabbitMQ's own topic-matching cases (`topic_matching1` in its `deps/rabbit`
    /// test suites), without the binding arguments, which we do not have: the same
    /// bindings must route the same keys to the same queues.
    #[test]
    fn rabbitmq_topic_matching_suite() {
        let bindings = [
            ("a.b.c", "t1"),
            ("a.*.c", "t2"),
            ("a.#.b", "t3"),
            ("a.b.b.c", "t4"),
            ("#", "t5"),
            ("#.#", "t6"),
            ("#.b", "t7"),
            ("*.*", "t8"),
            ("a.*", "t9"),
            ("*.b.c", "t10"),
            ("a.#", "t11"),
            ("a.#.#", "t12"),
            ("b.b.c", "t13"),
            ("a.b.b", "t14"),
            ("a.b", "t15"),
            ("b.c", "t16"),
            ("", "t17"),
            ("*.*.*", "t18"),
            ("vodka.martini", "t19"),
            ("a.b.c", "t20"),
            ("*.#", "t21"),
            ("#.*.#", "t22"),
            ("*.#.#", "t23"),
            ("#.#.#", "t24"),
            ("*", "t25"),
            ("#.b.#", "t26"),
            ("args-test", "t27"),
        ];
        let expected: [(&str, &[&str]); 12] = [
            (
                "a.b.c",
                &[
                    "t1", "t2", "t5", "t6", "t10", "t11", "t12", "t18", "t20", "t21", "t22", "t23",
                    "t24", "t26",
                ],
            ),
            (
                "a.b",
                &[
                    "t3", "t5", "t6", "t7", "t8", "t9", "t11", "t12", "t15", "t21", "t22", "t23",
                    "t24", "t26",
                ],
            ),
            (
                "a.b.b",
                &[
                    "t3", "t5", "t6", "t7", "t11", "t12", "t14", "t18", "t21", "t22", "t23", "t24",
                    "t26",
                ],
            ),
            ("", &["t5", "t6", "t17", "t24"]),
            (
                "b.c.c",
                &["t5", "t6", "t18", "t21", "t22", "t23", "t24", "t26"],
            ),
            (
                "a.a.a.a.a",
                &["t5", "t6", "t11", "t12", "t21", "t22", "t23", "t24"],
            ),
            ("vodka.gin", &["t5", "t6", "t8", "t21", "t22", "t23", "t24"]),
            (
                "vodka.martini",
                &["t5", "t6", "t8", "t19", "t21", "t22", "t23", "t24"],
            ),
            (
                "b.b.c",
                &[
                    "t5", "t6", "t10", "t13", "t18", "t21", "t22", "t23", "t24", "t26",
                ],
            ),
            (
                "nothing.here.at.all",
                &["t5", "t6", "t21", "t22", "t23", "t24"],
            ),
            ("oneword", &["t5", "t6", "t21", "t22", "t23", "t24", "t25"]),
            (
                "args-test",
                &["t5", "t6", "t21", "t22", "t23", "t24", "t25", "t27"],
            ),
        ];
        for (key, want) in expected {
            let mut got: Vec<&str> = bindings
                .iter()
                .filter(|(pattern, _)| matches(pattern, key))
                .map(|(_, queue)| *queue)
                .collect();
            got.dedup();
            assert_eq!(got, want, "routing key {key:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn matches_like_the_reference_model(
            pattern in reference::pattern(),
            key in reference::routing_key(),
        ) {
            let compiled = TopicPattern::parse(&pattern).unwrap_or_else(|e| panic!("{e}"));
            prop_assert_eq!(
                compiled.matches(&key),
                reference::matches(&pattern, &key),
                "pattern {:?}, key {:?}", pattern, key
            );
        }

        #[test]
        fn every_key_used_as_a_pattern_matches_itself(key in reference::routing_key()) {
            // Holds even when the key has `*` or `#` words: each matches one word.
            let compiled = TopicPattern::parse(&key).unwrap_or_else(|e| panic!("{e}"));
            prop_assert!(compiled.matches(&key), "{:?}", key);
            prop_assert_eq!(compiled.as_str(), key.as_str());
        }
    }

    /// Rough per-call cost; run with
    /// `cargo test --release -p switchboard --lib route::pattern -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a check"]
    fn timing() {
        use std::hint::black_box;
        use std::time::Instant;

        let cases = [
            ("payment.success", "payment.success"),
            ("payment.*", "payment.success"),
            ("payment.#", "payment.card.eu.success"),
            ("#.success", "payment.card.eu.success"),
            ("*.card.#.failed", "payment.card.eu.success"),
        ];
        const CALLS: u32 = 1_000_000;
        for (pattern, key) in cases {
            let compiled = TopicPattern::parse(pattern).unwrap_or_else(|e| panic!("{e}"));
            let start = Instant::now();
            let mut hits = 0_u32;
            for _ in 0..CALLS {
                hits += u32::from(black_box(&compiled).matches(black_box(key)));
            }
            let per_call = start.elapsed() / CALLS;
            eprintln!("{pattern:>20} vs {key:<26} {per_call:?}/call ({hits} hits)");
        }
    }
}
