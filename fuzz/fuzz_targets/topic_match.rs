//! Topic patterns and the route table against a model of RabbitMQ's matching.
//!
//! The input is text, one binding pattern per line and the routing key on the
//! last line (`payment.*\n#.failed\npayment.card.failed`), so that seeds and
//! crash files can be read. Pattern `n` is bound for plugin `p{n % 3}`.
//!
//! Checked: compiling never panics and refuses exactly the patterns longer than
//! 255 bytes; a compiled pattern agrees with the model below on the key; a key
//! used as a pattern matches itself; topic, direct and fanout route tables send
//! the key to exactly the plugins the model says, each once, sorted.

#![no_main]

use std::collections::BTreeSet;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use switchboard::route::{Binding, ExchangeKind, MAX_PATTERN_LEN, RouteTable, TopicPattern};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines: Vec<&str> = text.split('\n').collect();
    let key = lines.pop().unwrap_or_default();
    let patterns = lines;

    for pattern in &patterns {
        check_pattern(pattern, key);
    }
    if key.len() <= MAX_PATTERN_LEN {
        let itself = compile(key);
        assert!(itself.matches(key), "key {key:?} used as a pattern");
    }
    check_tables(&patterns, key);
});

fn compile(pattern: &str) -> TopicPattern {
    TopicPattern::parse(pattern).unwrap_or_else(|e| panic!("{pattern:?} refused: {e}"))
}

fn check_pattern(pattern: &str, key: &str) {
    match TopicPattern::parse(pattern) {
        Ok(compiled) => {
            assert!(pattern.len() <= MAX_PATTERN_LEN, "{pattern:?} accepted");
            assert_eq!(compiled.as_str(), pattern);
            assert_eq!(
                compiled.matches(key),
                model(pattern, key),
                "pattern {pattern:?}, key {key:?}"
            );
        }
        Err(error) => {
            assert!(
                pattern.len() > MAX_PATTERN_LEN,
                "{pattern:?} refused: {error}"
            );
            let text = error.to_string();
            assert!(text.contains(&pattern.len().to_string()), "{text}");
        }
    }
}

fn check_tables(patterns: &[&str], key: &str) {
    let plugin = |at: usize| format!("p{}", at % 3);
    let bindings = |kind: ExchangeKind| {
        patterns
            .iter()
            .enumerate()
            .map(move |(at, pattern)| Binding {
                exchange: "x".into(),
                kind,
                pattern: (*pattern).into(),
                plugin: plugin(at),
            })
    };
    let all_fit = patterns.iter().all(|p| p.len() <= MAX_PATTERN_LEN);
    let expected = |hit: &dyn Fn(&str) -> bool| -> Vec<String> {
        let plugins: BTreeSet<String> = patterns
            .iter()
            .enumerate()
            .filter(|(_, p)| hit(p))
            .map(|(at, _)| plugin(at))
            .collect();
        plugins.into_iter().collect()
    };
    let cases: [(ExchangeKind, Vec<String>); 3] = [
        (ExchangeKind::Topic, expected(&|p| model(p, key))),
        (ExchangeKind::Direct, expected(&|p| p == key)),
        (ExchangeKind::Fanout, expected(&|_| true)),
    ];
    for (kind, want) in cases {
        match RouteTable::new(bindings(kind)) {
            Ok(table) => {
                assert!(all_fit, "{kind} table accepted a key longer than 255 bytes");
                let got = names(table.destinations("x", key));
                assert_eq!(got, want, "{kind} exchange, key {key:?}");
                let mut each = Vec::new();
                table.for_each_destination("x", key, |p| each.push(Arc::clone(p)));
                assert_eq!(names(each), got);
                assert!(table.destinations("y", key).is_empty());
                if !patterns.is_empty() {
                    assert_eq!(table.kind("x"), Some(kind));
                }
            }
            Err(error) => {
                assert!(!all_fit, "{kind} table refused: {error}");
                assert!(!error.to_string().is_empty());
            }
        }
    }
}

fn names(plugins: Vec<Arc<str>>) -> Vec<String> {
    plugins.iter().map(|p| p.to_string()).collect()
}

/// RabbitMQ's `split_topic_key`: the empty string is no words; otherwise split
/// on `.`.
fn words(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('.').collect()
    }
}

/// The definition of topic matching (the model in `host/src/route/reference.rs`),
/// tabulated so that long fuzz inputs stay fast: `matched[i][j]` says whether
/// pattern words `i..` match key words `j..`.
fn model(pattern: &str, key: &str) -> bool {
    let (p, k) = (words(pattern), words(key));
    let width = k.len() + 1;
    let mut matched = vec![false; (p.len() + 1) * width];
    let at = |i: usize, j: usize| i * width + j;
    matched[at(p.len(), k.len())] = true;
    for i in (0..p.len()).rev() {
        for j in (0..=k.len()).rev() {
            let one_word = j < k.len();
            matched[at(i, j)] = match p[i] {
                // `#`: swallow no word, or one and stay on the `#`.
                "#" => matched[at(i + 1, j)] || (one_word && matched[at(i, j + 1)]),
                // `*`: exactly one word.
                "*" => one_word && matched[at(i + 1, j + 1)],
                // Anything else, `a*` and `#b` included, must equal the key's word.
                literal => one_word && k[j] == literal && matched[at(i + 1, j + 1)],
            };
        }
    }
    matched[at(0, 0)]
}
