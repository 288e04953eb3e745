//! The route table: which plugins an event published to (exchange, routing key)
//! goes to.
//!
//! Built once from the configured bindings and then only read, on every event: each
//! exchange is looked up by name, and its bindings are precompiled for its kind —
//! fanout keeps the sorted plugin list, direct a map from binding key to plugins,
//! topic the patterns grouped per plugin in name order. Grouping per plugin is what
//! gives AMQP's "one copy per queue" without a set: a plugin is emitted once, as soon
//! as any of its patterns matches, and plugins come out sorted by name.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::pattern::{MAX_PATTERN_LEN, PatternError, TopicPattern};

/// The AMQP exchange types Switchboard routes through.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Binding keys are [`TopicPattern`]s: `*` one word, `#` zero or more. The
    /// default.
    #[default]
    Topic,
    /// Every binding receives every message; binding keys are ignored.
    Fanout,
    /// A binding receives messages whose routing key equals its binding key, byte for
    /// byte (`*` and `#` are ordinary characters).
    Direct,
}

impl ExchangeKind {
    /// The name RabbitMQ and `router.toml` use: `topic`, `fanout` or `direct`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Fanout => "fanout",
            Self::Direct => "direct",
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not an exchange kind we route through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown exchange kind {0:?}; expected \"topic\", \"fanout\" or \"direct\"")]
pub struct UnknownExchangeKind(
    /// The name given.
    pub String,
);

impl FromStr for ExchangeKind {
    type Err = UnknownExchangeKind;

    /// Parses the lowercase names, exactly as serde does.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "topic" => Ok(Self::Topic),
            "fanout" => Ok(Self::Fanout),
            "direct" => Ok(Self::Direct),
            other => Err(UnknownExchangeKind(other.to_owned())),
        }
    }
}

/// One route: messages on `exchange` whose routing key fits `pattern` go to `plugin`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Binding {
    /// The exchange messages are published to.
    pub exchange: String,
    /// That exchange's type; every binding on one exchange must agree.
    pub kind: ExchangeKind,
    /// The binding key: a topic pattern, a direct key, or ignored for fanout.
    pub pattern: String,
    /// The plugin (and so the queue) that receives the matching messages.
    pub plugin: String,
}

impl fmt::Display for Binding {
    /// `payments (topic) "payment.*" → billing`, for logs and `switchboard check`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}) {:?} → {}",
            self.exchange, self.kind, self.pattern, self.plugin
        )
    }
}

/// Why a set of bindings does not make a route table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A binding's key is not a valid pattern (on any kind of exchange, a key longer
    /// than 255 bytes could never be bound on RabbitMQ).
    #[error("route from exchange {exchange:?} to plugin {plugin:?}: {error}")]
    Pattern {
        /// The binding's exchange.
        exchange: String,
        /// The binding's plugin.
        plugin: String,
        /// What is wrong with its key.
        error: PatternError,
    },
    /// Two bindings give one exchange different kinds (RabbitMQ refuses to redeclare
    /// an exchange with another type).
    #[error(
        "exchange {exchange:?} is bound as {first} for plugin {first_plugin:?} \
         and as {second} for plugin {second_plugin:?}; an exchange has one kind"
    )]
    ConflictingKind {
        /// The exchange.
        exchange: String,
        /// The kind its first binding gives it.
        first: ExchangeKind,
        /// The plugin of that first binding.
        first_plugin: String,
        /// The different kind a later binding gives it.
        second: ExchangeKind,
        /// The plugin of that later binding.
        second_plugin: String,
    },
}

/// Where each exchange's messages go. Cheap to share (`Arc`/`ArcSwap`) and read
/// from many threads; a config reload builds a new table rather than editing one.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// As configured, for printing.
    bindings: Vec<Binding>,
    /// Sorted by name.
    exchanges: Vec<Exchange>,
    /// Exchange name → position in `exchanges`.
    index: HashMap<Box<str>, usize>,
}

#[derive(Debug, Clone)]
struct Exchange {
    name: Box<str>,
    kind: ExchangeKind,
    /// How many distinct plugins are bound: the most destinations one event can have.
    plugin_count: usize,
    routes: Routes,
}

#[derive(Debug, Clone)]
enum Routes {
    /// Every plugin bound, sorted, each once.
    Fanout(Box<[Arc<str>]>),
    /// Binding key → the plugins bound with it, sorted, each once.
    Direct(HashMap<Box<str>, Box<[Arc<str>]>>),
    /// One entry per plugin, sorted by plugin.
    Topic(Box<[TopicRoute]>),
}

/// The bindings on one exchange while the table is built, with the first binding,
/// whose kind the others must share.
struct Group<'a> {
    first: &'a Binding,
    members: Vec<(&'a Binding, Arc<str>)>,
}

#[derive(Debug, Clone)]
struct TopicRoute {
    plugin: Arc<str>,
    /// The plugin's distinct patterns on this exchange.
    patterns: Box<[TopicPattern]>,
}

impl RouteTable {
    /// Compiles `bindings`. Fails on a key longer than 255 bytes (any kind) or an
    /// exchange given two kinds; duplicate bindings are harmless, as in AMQP.
    pub fn new(bindings: impl IntoIterator<Item = Binding>) -> Result<Self, RouteError> {
        let bindings: Vec<Binding> = bindings.into_iter().collect();

        // Group by exchange, checking kinds agree; sharing one `Arc` per plugin name.
        let mut plugins: BTreeMap<&str, Arc<str>> = BTreeMap::new();
        let mut grouped: BTreeMap<&str, Group<'_>> = BTreeMap::new();
        for binding in &bindings {
            if binding.pattern.len() > MAX_PATTERN_LEN {
                return Err(RouteError::Pattern {
                    exchange: binding.exchange.clone(),
                    plugin: binding.plugin.clone(),
                    error: PatternError::TooLong {
                        pattern: binding.pattern.clone(),
                        len: binding.pattern.len(),
                    },
                });
            }
            let plugin = Arc::clone(
                plugins
                    .entry(&binding.plugin)
                    .or_insert_with(|| Arc::from(binding.plugin.as_str())),
            );
            let group = grouped.entry(&binding.exchange).or_insert_with(|| Group {
                first: binding,
                members: Vec::new(),
            });
            let first = group.first;
            if first.kind != binding.kind {
                return Err(RouteError::ConflictingKind {
                    exchange: binding.exchange.clone(),
                    first: first.kind,
                    first_plugin: first.plugin.clone(),
                    second: binding.kind,
                    second_plugin: binding.plugin.clone(),
                });
            }
            group.members.push((binding, plugin));
        }

        let mut exchanges = Vec::with_capacity(grouped.len());
        for (name, Group { first, members }) in grouped {
            let routes = match first.kind {
                ExchangeKind::Fanout => Routes::Fanout(sorted_unique(
                    members.iter().map(|(_, plugin)| plugin).cloned().collect(),
                )),
                ExchangeKind::Direct => {
                    let mut by_key: HashMap<Box<str>, Vec<Arc<str>>> = HashMap::new();
                    for (binding, plugin) in &members {
                        by_key
                            .entry(binding.pattern.as_str().into())
                            .or_default()
                            .push(Arc::clone(plugin));
                    }
                    Routes::Direct(
                        by_key
                            .into_iter()
                            .map(|(key, plugins)| (key, sorted_unique(plugins)))
                            .collect(),
                    )
                }
                ExchangeKind::Topic => {
                    let mut by_plugin: BTreeMap<Arc<str>, Vec<TopicPattern>> = BTreeMap::new();
                    for (binding, plugin) in &members {
                        let pattern = TopicPattern::parse(&binding.pattern).map_err(|error| {
                            RouteError::Pattern {
                                exchange: binding.exchange.clone(),
                                plugin: binding.plugin.clone(),
                                error,
                            }
                        })?;
                        let patterns = by_plugin.entry(Arc::clone(plugin)).or_default();
                        if !patterns.contains(&pattern) {
                            patterns.push(pattern);
                        }
                    }
                    Routes::Topic(
                        by_plugin
                            .into_iter()
                            .map(|(plugin, patterns)| TopicRoute {
                                plugin,
                                patterns: patterns.into_boxed_slice(),
                            })
                            .collect(),
                    )
                }
            };
            let plugin_count = sorted_unique(members.into_iter().map(|(_, p)| p).collect()).len();
            exchanges.push(Exchange {
                name: name.into(),
                kind: first.kind,
                plugin_count,
                routes,
            });
        }
        let index = exchanges
            .iter()
            .enumerate()
            .map(|(at, exchange)| (exchange.name.clone(), at))
            .collect();
        Ok(Self {
            bindings,
            exchanges,
            index,
        })
    }

    /// The plugins an event published to `exchange` with `routing_key` goes to: each
    /// once however many of its bindings match, sorted by name. Empty for an exchange
    /// nothing is bound to.
    pub fn destinations(&self, exchange: &str, routing_key: &str) -> Vec<Arc<str>> {
        let Some(exchange) = self.exchange(exchange) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(exchange.plugin_count);
        exchange.for_each_destination(routing_key, |plugin| out.push(Arc::clone(plugin)));
        out
    }

    /// Calls `f` with each plugin [`destinations`](Self::destinations) would return,
    /// in the same order, without allocating.
    pub fn for_each_destination(
        &self,
        exchange: &str,
        routing_key: &str,
        f: impl FnMut(&Arc<str>),
    ) {
        if let Some(exchange) = self.exchange(exchange) {
            exchange.for_each_destination(routing_key, f);
        }
    }

    /// The bindings the table was built from, in the order given (duplicates kept).
    pub fn bindings(&self) -> impl Iterator<Item = &Binding> + '_ {
        self.bindings.iter()
    }

    /// Every exchange something is bound to, with its kind, sorted by name.
    pub fn exchanges(&self) -> impl Iterator<Item = (&str, ExchangeKind)> + '_ {
        self.exchanges.iter().map(|x| (&*x.name, x.kind))
    }

    /// The kind of `exchange`, if anything is bound to it.
    pub fn kind(&self, exchange: &str) -> Option<ExchangeKind> {
        self.exchange(exchange).map(|x| x.kind)
    }

    /// Whether nothing is bound at all.
    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }

    fn exchange(&self, name: &str) -> Option<&Exchange> {
        self.index.get(name).and_then(|&at| self.exchanges.get(at))
    }
}

impl Exchange {
    fn for_each_destination(&self, routing_key: &str, mut f: impl FnMut(&Arc<str>)) {
        match &self.routes {
            Routes::Fanout(plugins) => plugins.iter().for_each(f),
            Routes::Direct(by_key) => {
                if let Some(plugins) = by_key.get(routing_key) {
                    plugins.iter().for_each(f);
                }
            }
            Routes::Topic(routes) => {
                for route in routes {
                    if route.patterns.iter().any(|p| p.matches(routing_key)) {
                        f(&route.plugin);
                    }
                }
            }
        }
    }
}

fn sorted_unique(mut plugins: Vec<Arc<str>>) -> Box<[Arc<str>]> {
    plugins.sort_unstable();
    plugins.dedup();
    plugins.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::route::reference;
    use ExchangeKind::{Direct, Fanout, Topic};

    fn bind(exchange: &str, kind: ExchangeKind, pattern: &str, plugin: &str) -> Binding {
        Binding {
            exchange: exchange.to_owned(),
            kind,
            pattern: pattern.to_owned(),
            plugin: plugin.to_owned(),
        }
    }

    fn table(bindings: &[Binding]) -> RouteTable {
        RouteTable::new(bindings.iter().cloned()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn names(plugins: Vec<Arc<str>>) -> Vec<String> {
        plugins.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn topic_exchange_sends_one_copy_per_plugin_sorted_by_name() {
        let t = table(&[
            bind("payments", Topic, "payment.*", "notification"),
            bind("payments", Topic, "payment.#", "billing"),
            bind("payments", Topic, "#.success", "billing"),
            bind("payments", Topic, "payment.success", "billing"),
            bind("payments", Topic, "refund.#", "analytics"),
            bind("payments", Topic, "#", "audit"),
        ]);
        assert_eq!(
            names(t.destinations("payments", "payment.success")),
            ["audit", "billing", "notification"]
        );
        assert_eq!(
            names(t.destinations("payments", "refund.issued")),
            ["analytics", "audit"]
        );
        assert_eq!(names(t.destinations("payments", "")), ["audit"]);
    }

    #[test]
    fn unknown_exchange_routes_nowhere() {
        let t = table(&[bind("payments", Topic, "#", "audit")]);
        assert!(t.destinations("orders", "payment.success").is_empty());
        assert!(t.destinations("", "").is_empty());
        assert!(
            RouteTable::default()
                .destinations("payments", "x")
                .is_empty()
        );
        let mut calls = 0;
        t.for_each_destination("orders", "x", |_| calls += 1);
        assert_eq!(calls, 0);
    }

    #[test]
    fn direct_exchange_matches_the_whole_key_literally() {
        let t = table(&[
            bind("jobs", Direct, "resize", "images"),
            bind("jobs", Direct, "resize", "audit"),
            bind("jobs", Direct, "resize", "images"),
            bind("jobs", Direct, "*", "star"),
            bind("jobs", Direct, "#", "hash"),
            bind("jobs", Direct, "", "empty"),
        ]);
        assert_eq!(names(t.destinations("jobs", "resize")), ["audit", "images"]);
        assert!(t.destinations("jobs", "resize.png").is_empty());
        assert!(t.destinations("jobs", "Resize").is_empty());
        assert_eq!(names(t.destinations("jobs", "*")), ["star"]);
        assert_eq!(names(t.destinations("jobs", "#")), ["hash"]);
        assert_eq!(names(t.destinations("jobs", "")), ["empty"]);
        assert!(t.destinations("jobs", "anything").is_empty());
    }

    #[test]
    fn fanout_exchange_ignores_keys() {
        let t = table(&[
            bind("broadcast", Fanout, "ignored", "b"),
            bind("broadcast", Fanout, "", "a"),
            bind("broadcast", Fanout, "also.ignored", "b"),
            bind("broadcast", Fanout, "a.*.[not a pattern", "c"),
        ]);
        for key in ["", "ignored", "x.y.z", "#"] {
            assert_eq!(names(t.destinations("broadcast", key)), ["a", "b", "c"]);
        }
    }

    #[test]
    fn exchanges_are_independent() {
        let t = table(&[
            bind("payments", Topic, "#", "billing"),
            bind("orders", Direct, "placed", "fulfilment"),
            bind("broadcast", Fanout, "", "audit"),
        ]);
        assert_eq!(names(t.destinations("payments", "placed")), ["billing"]);
        assert_eq!(names(t.destinations("orders", "placed")), ["fulfilment"]);
        assert_eq!(names(t.destinations("broadcast", "placed")), ["audit"]);
        assert_eq!(
            t.exchanges().collect::<Vec<_>>(),
            [
                ("broadcast", Fanout),
                ("orders", Direct),
                ("payments", Topic)
            ]
        );
        assert_eq!(t.kind("orders"), Some(Direct));
        assert_eq!(t.kind("nope"), None);
        assert_eq!(t.bindings().count(), 3);
        assert_eq!(
            t.bindings().next().map(|b| b.plugin.as_str()),
            Some("billing")
        );
    }

    #[test]
    fn an_exchange_has_one_kind() {
        let error = RouteTable::new([
            bind("payments", Topic, "#", "billing"),
            bind("payments", Direct, "x", "audit"),
        ])
        .err();
        assert_eq!(
            error.map(|e| e.to_string()).as_deref(),
            Some(
                "exchange \"payments\" is bound as topic for plugin \"billing\" \
                 and as direct for plugin \"audit\"; an exchange has one kind"
            )
        );
    }

    #[test]
    fn overlong_keys_are_refused_naming_the_route() {
        for kind in [Topic, Direct, Fanout] {
            let long = "k".repeat(256);
            let error = RouteTable::new([
                bind("payments", kind, "ok", "audit"),
                bind("payments", kind, &long, "billing"),
            ])
            .err();
            let message = error.map(|e| e.to_string()).unwrap_or_default();
            assert!(
                message.starts_with(
                    "route from exchange \"payments\" to plugin \"billing\": binding pattern"
                ),
                "{message}"
            );
            assert!(message.contains(&long), "{message}");
        }
    }

    #[test]
    fn exchange_kind_names() {
        for (kind, name) in [(Topic, "topic"), (Fanout, "fanout"), (Direct, "direct")] {
            assert_eq!(kind.to_string(), name);
            assert_eq!(name.parse::<ExchangeKind>(), Ok(kind));
            assert_eq!(
                serde_json::to_string(&kind).ok(),
                Some(format!("\"{name}\""))
            );
            assert_eq!(
                serde_json::from_str::<ExchangeKind>(&format!("\"{name}\"")).ok(),
                Some(kind)
            );
        }
        assert_eq!(
            "Topic".parse::<ExchangeKind>().map_err(|e| e.to_string()),
            Err(
                "unknown exchange kind \"Topic\"; expected \"topic\", \"fanout\" or \"direct\""
                    .to_owned()
            )
        );
        assert!(serde_json::from_str::<ExchangeKind>("\"headers\"").is_err());
    }

    #[test]
    fn binding_display() {
        assert_eq!(
            bind("payments", Topic, "payment.*", "billing").to_string(),
            "payments (topic) \"payment.*\" → billing"
        );
    }

    /// Exchanges of each kind, and one nothing is bound to.
    const EXCHANGES: [(&str, ExchangeKind); 3] = [("t", Topic), ("d", Direct), ("f", Fanout)];

    fn bindings() -> impl Strategy<Value = Vec<Binding>> {
        let binding = (
            prop::sample::select(&EXCHANGES[..]),
            reference::pattern(),
            prop::sample::select(&["p1", "p2", "p3", "p4", "p5"][..]),
        )
            .prop_map(|((exchange, kind), pattern, plugin)| bind(exchange, kind, &pattern, plugin));
        prop::collection::vec(binding, 0..24)
    }

    /// What AMQP says, the slow way: every binding on the exchange that matches,
    /// as a set of queue names.
    fn brute_force(bindings: &[Binding], exchange: &str, key: &str) -> Vec<String> {
        let set: BTreeSet<&str> = bindings
            .iter()
            .filter(|b| b.exchange == exchange)
            .filter(|b| match b.kind {
                Topic => reference::matches(&b.pattern, key),
                Direct => b.pattern == key,
                Fanout => true,
            })
            .map(|b| b.plugin.as_str())
            .collect();
        set.into_iter().map(str::to_owned).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn destinations_are_every_matching_binding_once_in_name_order(
            bindings in bindings(),
            exchange in prop::sample::select(&["t", "d", "f", "missing"][..]),
            key in prop_oneof![reference::routing_key(), reference::pattern()],
        ) {
            let t = table(&bindings);
            let got = names(t.destinations(exchange, &key));
            prop_assert_eq!(&got, &brute_force(&bindings, exchange, &key));
            let mut seen = Vec::new();
            t.for_each_destination(exchange, &key, |p| seen.push(p.to_string()));
            prop_assert_eq!(got, seen);
        }
    }

    /// Rough per-event cost; run with
    /// `cargo test --release -p switchboard --lib route::table -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a check"]
    fn timing() {
        use std::hint::black_box;
        use std::time::Instant;

        // A plausible appliance: 30 plugins, 60 topic routes on two exchanges.
        let mut bindings = Vec::new();
        for i in 0..30 {
            let plugin = format!("plugin-{i:02}");
            bindings.push(bind(
                "payments",
                Topic,
                &format!("payment.kind{i}.*"),
                &plugin,
            ));
            bindings.push(bind("orders", Topic, &format!("order.#.step{i}"), &plugin));
        }
        bindings.push(bind("payments", Topic, "payment.#", "audit"));
        bindings.push(bind("payments", Topic, "#.success", "billing"));
        let t = table(&bindings);
        const CALLS: u32 = 1_000_000;
        for (exchange, key) in [
            ("payments", "payment.kind7.success"),
            ("orders", "order.eu.card.step3"),
            ("missing", "payment.kind7.success"),
        ] {
            let start = Instant::now();
            let mut total = 0;
            for _ in 0..CALLS {
                total += black_box(&t)
                    .destinations(black_box(exchange), black_box(key))
                    .len();
            }
            let per_call = start.elapsed() / CALLS;
            eprintln!("destinations({exchange}, {key}): {per_call:?}/call ({total} destinations)");
        }
    }
}
