use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;
use proptest::prelude::*;

use super::*;

const SHIPPED: &str = include_str!("../../../router.toml");

fn parse(text: &str) -> Result<RouterConfig, ConfigError> {
    RouterConfig::parse(text, Path::new("/etc/switchboard"))
}

fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Err(ConfigError::Invalid { errors, .. }) => errors,
        other => panic!("expected validation errors, got {other:?}"),
    }
}

fn parse_error(text: &str) -> (usize, usize, String) {
    match parse(text) {
        Err(ConfigError::Parse {
            line,
            column,
            message,
            ..
        }) => (line, column, message),
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn the_shipped_router_toml_parses_and_routes_to_its_plugins() {
    let config = parse(SHIPPED).unwrap();
    assert_eq!(config.plugins_dir, Path::new("/etc/switchboard/plugins"));
    assert_eq!(config.state_dir, Path::new("/etc/switchboard/.switchboard"));
    assert!(
        config.broker.url.is_none(),
        "runs on the embedded bus as-is"
    );
    assert_eq!(
        config.plugins.keys().collect::<Vec<_>>(),
        ["analytics", "billing", "notification", "orders"]
    );
    assert_eq!(config.exchanges.len(), 1);
    assert_eq!(config.exchanges[0].kind, ExchangeKind::Topic);
    assert!(config.routes.iter().all(|r| r.exchange == "events"));
    let notification = config.plugin_settings("notification").unwrap();
    assert_eq!(
        notification
            .config
            .get("bill.paid.subject")
            .map(String::as_str),
        Some("Payment received for bill {{bill_id}}")
    );
    assert_eq!(
        notification.wasm,
        Path::new("/etc/switchboard/plugins/notification.wasm")
    );
    assert_eq!(
        config.plugin_settings("analytics").unwrap().config["forward"],
        "false"
    );
}

#[test]
fn an_empty_file_is_the_documented_defaults() {
    let config = parse("").unwrap();
    assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.broker.prefix, "switchboard");
    assert!(config.runtime.pooling && config.runtime.cache);
    assert_eq!(config.runtime.max_instances, 256);
    assert_eq!(config.runtime.max_stack, ByteSize::kib(512));
    let d = &config.defaults;
    assert_eq!(
        (d.prefetch, d.concurrency, d.instance_reuse, d.max_attempts),
        (64, 2, 1000, 5)
    );
    assert_eq!((d.max_hops, d.queue_capacity), (10, 10_000));
    assert_eq!(d.timeout, Duration::from_secs(5));
    assert_eq!(d.memory, ByteSize::mib(64));
    assert_eq!(d.backoff, Backoff::default());
    assert_eq!(d.backoff.initial, Duration::from_millis(500));
    assert_eq!(d.backoff.max, Duration::from_secs(60));
    let runtime = config.runtime_config();
    assert_eq!(
        runtime.cache_dir.as_deref(),
        Some(Path::new("/etc/switchboard/.switchboard/cache"))
    );
    assert_eq!(runtime.max_stack, 512 << 10);
}

#[test]
fn plugin_overrides_replace_defaults_field_by_field() {
    let config = parse(
        r#"
        [defaults]
        timeout = "2s"
        concurrency = 4
        [plugins.billing]
        file = "billing-v2.wasm"
        timeout = "30s"
        memory = "128MiB"
        max_attempts = 3
        dedupe = "10m"
        output_exchange = "events"
        backoff = { initial = "1s" }
        [plugins.audit]
        enabled = false
        file = "/opt/audit.wasm"
        [[exchanges]]
        name = "events"
        "#,
    )
    .unwrap();
    let billing = config.plugin_settings("billing").unwrap();
    assert_eq!(
        billing.wasm,
        Path::new("/etc/switchboard/plugins/billing-v2.wasm")
    );
    assert_eq!(billing.timeout, Duration::from_secs(30));
    assert_eq!(billing.memory, ByteSize::mib(128));
    assert_eq!(billing.max_attempts, 3);
    assert_eq!(billing.concurrency, 4, "inherited from [defaults]");
    assert_eq!(billing.prefetch, 64);
    assert_eq!(billing.dedupe, Some(Duration::from_secs(600)));
    assert_eq!(billing.output_exchange.as_deref(), Some("events"));
    assert_eq!(billing.backoff.initial, Duration::from_secs(1));
    assert_eq!(billing.backoff.max, Duration::from_secs(60));
    let limits = billing.limits();
    assert_eq!(limits.timeout, Duration::from_secs(30));
    assert_eq!(limits.memory, 128 << 20);

    let audit = config.plugin_settings("audit").unwrap();
    assert!(!audit.enabled);
    assert_eq!(audit.wasm, Path::new("/opt/audit.wasm"));
    assert_eq!(audit.timeout, Duration::from_secs(2));
    assert!(config.plugin_settings("nope").is_none());
}

#[test]
fn ordered_plugins_take_one_event_at_a_time() {
    let config =
        parse("[plugins.ledger]\nordered = true\nconcurrency = 8\nprefetch = 100\n").unwrap();
    let ledger = config.plugin_settings("ledger").unwrap();
    assert!(ledger.ordered);
    assert_eq!((ledger.concurrency, ledger.prefetch), (1, 1));
}

#[test]
fn a_route_takes_one_pattern_or_several_but_not_both() {
    let config = parse(
        r#"
        [[exchanges]]
        name = "payments"
        kind = "direct"
        durable = false
        [plugins.billing]
        [[routes]]
        exchange = "payments"
        pattern = "payment.success"
        plugin = "billing"
        "#,
    )
    .unwrap();
    assert_eq!(config.routes[0].patterns, ["payment.success"]);
    assert_eq!(config.exchanges[0].kind, ExchangeKind::Direct);
    assert!(!config.exchanges[0].durable);

    let (line, _, message) = parse_error(
        "[[routes]]\nexchange = \"e\"\npattern = \"a\"\npatterns = [\"b\"]\nplugin = \"p\"\n",
    );
    assert_eq!(line, 1);
    assert!(
        message.contains("both `patterns` and `pattern`"),
        "{message}"
    );
    let (_, _, message) = parse_error("[[routes]]\nexchange = \"e\"\nplugin = \"p\"\n");
    assert!(message.contains("has no pattern"), "{message}");
}

#[test]
fn unknown_keys_are_errors_with_line_column_and_key() {
    let text = "plugins_dir = \"plugins\"\n\n[defaults]\ntimeout = \"5s\"\nconcurency = 2\n";
    let (line, column, message) = parse_error(text);
    assert_eq!((line, column), (5, 1));
    assert!(message.contains("unknown field `concurency`"), "{message}");
    assert!(
        message.contains("`concurrency`"),
        "lists the valid keys: {message}"
    );

    let (line, column, message) = parse_error("[plugins.billing]\n  colour = \"red\"\n");
    assert_eq!((line, column), (2, 3));
    assert!(message.contains("unknown field `colour`"), "{message}");

    let (line, _, message) = parse_error("[defaults.backoff]\nfactor = 3.0\n");
    assert_eq!(line, 2);
    assert!(message.contains("unknown field `factor`"), "{message}");

    let error = parse("[brokr]\nurl = \"amqp://localhost\"\n").unwrap_err();
    assert_eq!(
        error.to_string().lines().next().unwrap(),
        error.to_string(),
        "one line"
    );
    assert!(error.to_string().starts_with("router.toml:1:"), "{error}");
}

#[test]
fn durations_and_sizes_say_what_is_wrong_with_them() {
    let (line, column, message) = parse_error("[defaults]\ntimeout = \"5 parsecs\"\n");
    assert_eq!((line, column), (2, 11));
    assert!(
        message.contains("invalid duration \"5 parsecs\""),
        "{message}"
    );
    assert!(message.contains("\"500ms\""), "gives an example: {message}");

    let (_, _, message) = parse_error("[defaults]\ntimeout = 5\n");
    assert!(message.contains("a duration with a unit"), "{message}");

    let (_, _, message) = parse_error("[plugins.p]\nmemory = \"64 MegaBytes\"\n");
    assert!(
        message.contains("invalid size \"64 MegaBytes\""),
        "{message}"
    );

    let config = parse("[defaults]\nmemory = 2097152\n").unwrap();
    assert_eq!(
        config.defaults.memory,
        ByteSize::mib(2),
        "a bare number is bytes"
    );
}

#[test]
fn validation_lists_every_problem_with_its_key() {
    let errors = problems(
        r##"
        [defaults]
        concurrency = 0
        timeout = "20m"
        [defaults.backoff]
        initial = "2m"
        max = "1m"
        jitter = 1.5
        [[exchanges]]
        name = "events"
        [[exchanges]]
        name = "events"
        [[exchanges]]
        name = "amq.topic"
        [plugins.billing]
        memory = "512KiB"
        output_exchange = "invoices"
        [plugins.notification]
        [plugins.analytics]
        enabled = false
        [plugins.Bad_Name]
        [[routes]]
        exchange = "events"
        patterns = ["bill.*"]
        plugin = "billing"
        [[routes]]
        exchange = "payments"
        patterns = [""]
        plugin = "billing"
        [[routes]]
        exchange = "events"
        pattern = "#"
        plugin = "biling"
        [[routes]]
        exchange = "events"
        pattern = "#"
        plugin = "analytics"
        "##,
    );
    let expected = [
        "exchanges[1].name: \"events\" is already declared by exchanges[0]",
        "exchanges[2].name: invalid name \"amq.topic\": names starting with \"amq.\" are reserved by RabbitMQ",
        "defaults.concurrency: must be at least 1, got 0",
        "defaults.timeout: must be between 1ms and 10m, got 20m",
        "defaults.backoff: initial (2m) is longer than max (1m)",
        "defaults.backoff.jitter: must be between 0 and 1, got 1.5",
        "plugins.Bad_Name: invalid plugin name \"Bad_Name\"",
        "plugins.billing.memory: must be between 1MiB and 4GiB, got 512KiB",
        "plugins.billing.output_exchange: unknown exchange \"invoices\" (declared: amq.topic, events)",
        "routes[1].exchange: unknown exchange \"payments\" (declared: amq.topic, events)",
        "routes[1].patterns[0]: invalid pattern \"\": empty",
        "routes[2].plugin: unknown plugin \"biling\" (declared: Bad_Name, analytics, billing, notification)",
    ];
    for want in expected {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in:\n{}",
            errors.join("\n")
        );
    }
    assert_eq!(errors.len(), expected.len(), "{}", errors.join("\n"));
}

#[test]
fn the_invalid_error_prints_one_problem_per_line() {
    let error =
        parse("[[routes]]\nexchange = \"x\"\npattern = \"a\"\nplugin = \"p\"\n").unwrap_err();
    assert_eq!(
        error.to_string(),
        "router.toml is not valid (2 problems):\n  \
         routes[0].exchange: unknown exchange \"x\" (none declared)\n  \
         routes[0].plugin: unknown plugin \"p\" (none declared)"
    );
}

#[test]
fn names_become_queues_so_they_are_restricted() {
    assert!(check_plugin_name("billing-v2_eu").is_ok());
    assert!(check_plugin_name("0day").is_ok());
    for bad in ["", "-x", "_x", "Billing", "bill.ing", "bill ing", "bïlling"] {
        assert!(check_plugin_name(bad).is_err(), "{bad:?}");
    }
    assert!(check_plugin_name(&"a".repeat(64)).is_ok());
    assert!(check_plugin_name(&"a".repeat(65)).is_err());

    assert!(check_exchange_name("orders.v1:eu-west_1").is_ok());
    for bad in ["", "amq.direct", "a b", "a/b"] {
        assert!(check_exchange_name(bad).is_err(), "{bad:?}");
    }
    assert!(check_exchange_name(&"e".repeat(255)).is_ok());
    assert!(check_exchange_name(&"e".repeat(256)).is_err());
}

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| vars.get(name).cloned()
}

#[test]
fn rabbitmq_url_from_the_environment_overrides_the_file() {
    let mut config = parse("[broker]\nurl = \"amqp://localhost\"\n").unwrap();
    config.apply_env(env(&[
        ("RABBITMQ_URL", "amqps://app:pw@rabbit:5671/prod"),
        ("RABBITMQ_HOST", "ignored"),
        ("SWITCHBOARD_HTTP_LISTEN", "0.0.0.0:9000"),
    ]));
    assert_eq!(
        config.broker.url.as_ref().unwrap().expose(),
        "amqps://app:pw@rabbit:5671/prod"
    );
    assert_eq!(config.http.listen.to_string(), "0.0.0.0:9000");
    assert!(config.validate().is_ok());
}

#[test]
fn rabbitmq_host_and_friends_build_a_url() {
    let mut config = parse("").unwrap();
    config.apply_env(env(&[("RABBITMQ_HOST", "rabbit")]));
    assert_eq!(
        config.broker.url.as_ref().unwrap().expose(),
        "amqp://guest:guest@rabbit:5672/%2f"
    );

    let mut config = parse("").unwrap();
    config.apply_env(env(&[
        ("RABBITMQ_HOST", "rabbit.internal"),
        ("RABBITMQ_PORT", "5673"),
        ("RABBITMQ_USER", "app"),
        ("RABBITMQ_PASSWORD", "p@ss/word"),
        ("RABBITMQ_VHOST", "prod"),
    ]));
    assert_eq!(
        config.broker.url.as_ref().unwrap().expose(),
        "amqp://app:p%40ss%2fword@rabbit.internal:5673/prod"
    );

    let mut config = parse("").unwrap();
    config.apply_env(env(&[("RABBITMQ_URL", ""), ("RABBITMQ_HOST", "")]));
    assert!(
        config.broker.url.is_none(),
        "empty variables count as unset"
    );
}

#[test]
fn malformed_environment_variables_are_validation_errors() {
    let mut config = parse("").unwrap();
    config.apply_env(env(&[
        ("RABBITMQ_HOST", "rabbit"),
        ("RABBITMQ_PORT", "amqp"),
        ("SWITCHBOARD_HTTP_LISTEN", "localhost"),
    ]));
    assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080", "kept");
    let errors = config.validate().unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("RABBITMQ_PORT: "), "{errors:?}");
    assert!(
        errors[1].starts_with("SWITCHBOARD_HTTP_LISTEN: "),
        "{errors:?}"
    );
}

#[test]
fn the_broker_password_never_shows() {
    let mut config = parse("[broker]\nurl = \"amqp://app:hunter2@rabbit/%2f\"\n").unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("amqp://***@rabbit/%2f"), "{debug}");

    config.apply_env(env(&[
        ("RABBITMQ_HOST", "rabbit"),
        ("RABBITMQ_PASSWORD", "hunter2"),
    ]));
    assert!(!format!("{config:?}").contains("hunter2"));

    let error = parse("[broker]\nurl = \"http://app:hunter2@rabbit\"\n").unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("broker.url: expected an amqp:// or amqps:// URL"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}

#[test]
fn load_resolves_paths_against_the_files_folder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router.toml");
    std::fs::write(
        &path,
        "plugins_dir = \"wasm\"\nstate_dir = \"/var/lib/sb\"\n",
    )
    .unwrap();
    let config = RouterConfig::load(&path).unwrap();
    assert_eq!(config.plugins_dir, dir.path().join("wasm"));
    assert_eq!(config.state_dir, Path::new("/var/lib/sb"));
    assert_eq!(config.kv_path(), Path::new("/var/lib/sb/kv.redb"));

    let missing = dir.path().join("nope.toml");
    let error = RouterConfig::load(&missing).unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }));
    assert!(
        error
            .to_string()
            .starts_with(&format!("cannot read {}", missing.display())),
        "{error}"
    );
}

#[test]
fn positions_count_characters_from_one() {
    assert_eq!(position("abc", 0), (1, 1));
    assert_eq!(position("a\nbc", 3), (2, 2));
    assert_eq!(position("é = 1\nx", 7), (2, 1));
    assert_eq!(position("ab", 99), (1, 3));
}

#[test]
fn the_kv_store_is_embedded_unless_redis_is_chosen() {
    let config = parse("").unwrap();
    assert_eq!(config.kv.backend, KvBackend::Embedded);
    assert!(config.redis_settings().is_none());

    let config = parse(
        "[kv]\nbackend = \"redis\"\nurl = \"redis://redis:6379/2\"\nprefix = \"shop\"\n\
         pool_size = 4\ntimeout = \"250ms\"\n",
    )
    .unwrap();
    let settings = config.redis_settings().unwrap();
    assert_eq!(settings.url.expose(), "redis://redis:6379/2");
    assert_eq!(settings.prefix, "shop");
    assert_eq!(settings.pool_size, 4);
    assert_eq!(settings.timeout, Duration::from_millis(250));
}

#[test]
fn redis_url_comes_from_the_environment_only_when_redis_is_chosen() {
    let mut config = RouterConfig::parse_unvalidated(
        "[kv]\nbackend = \"redis\"\n",
        Path::new("router.toml"),
        Path::new("/etc/switchboard"),
    )
    .unwrap();
    config.apply_env(env(&[("REDIS_URL", "redis://:s3cret@cache:6379/0")]));
    assert!(config.validate().is_ok(), "{:?}", config.validate());
    assert_eq!(
        config.redis_settings().unwrap().url.expose(),
        "redis://:s3cret@cache:6379/0"
    );

    let mut config = parse("").unwrap();
    config.apply_env(env(&[("REDIS_URL", "redis://cache:6379")]));
    assert!(config.kv.url.is_none(), "ignored with the embedded store");
    assert!(config.validate().is_ok());
}

#[test]
fn kv_settings_are_checked_without_showing_the_password() {
    let errors = problems("[kv]\nbackend = \"redis\"\n");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("kv.url: backend \"redis\" needs a URL"),
        "{errors:?}"
    );

    let errors = problems(
        "[kv]\nbackend = \"redis\"\nurl = \"http://:hunter2@cache\"\nprefix = \"a b\"\n\
         pool_size = 0\ntimeout = \"2m\"\n",
    );
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(
        errors[0].starts_with("kv.url: expected a redis://"),
        "{errors:?}"
    );
    assert!(errors[1].starts_with("kv.prefix: "), "{errors:?}");
    assert!(errors[2].starts_with("kv.pool_size: "), "{errors:?}");
    assert!(errors[3].starts_with("kv.timeout: "), "{errors:?}");
    assert!(errors.iter().all(|e| !e.contains("hunter2")), "{errors:?}");

    let errors = problems("[kv]\nurl = \"redis://cache\"\n");
    assert!(
        errors[0].contains("kv.backend is \"embedded\""),
        "{errors:?}"
    );

    let (line, _, message) = parse_error("[kv]\nbackend = \"memcached\"\n");
    assert_eq!(line, 2);
    assert!(message.contains("memcached"), "{message}");
}

#[test]
fn a_reload_names_the_settings_that_need_a_restart() {
    let running = parse("[kv]\nbackend = \"redis\"\nurl = \"redis://a:6379\"\n").unwrap();
    let same_kv = parse(
        "[kv]\nbackend = \"redis\"\nurl = \"redis://a:6379\"\n[defaults]\nmax_attempts = 9\n",
    )
    .unwrap();
    assert!(running.restart_only_changes(&same_kv).is_empty());
    let moved =
        parse("[kv]\nbackend = \"redis\"\nurl = \"redis://b:6379\"\n[broker]\nprefix = \"x\"\n")
            .unwrap();
    assert_eq!(running.restart_only_changes(&moved), ["[broker]", "[kv]"]);
    let archived =
        parse("[kv]\nbackend = \"redis\"\nurl = \"redis://a:6379\"\n[archive]\nenabled = true\n")
            .unwrap();
    assert_eq!(running.restart_only_changes(&archived), ["[archive]"]);
}

#[test]
fn the_admin_token_comes_from_the_environment_and_must_be_long_enough() {
    let mut config = parse("").unwrap();
    config.apply_env(env(&[("SWITCHBOARD_ADMIN_TOKEN", "0123456789abcdef0123")]));
    assert_eq!(
        config.http.token.as_ref().unwrap().expose(),
        "0123456789abcdef0123"
    );
    assert!(config.validate().is_ok());
    assert!(
        !format!("{config:?}").contains("0123456789abcdef0123"),
        "never printed"
    );

    let errors = problems("[http]\ntoken = \"short\"\n");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("http.token: must be at least 16"),
        "{errors:?}"
    );
    assert!(!errors[0].contains("short\""), "{errors:?}");
    let errors = problems("[http]\nprotect_reads = true\n");
    assert!(
        errors[0].starts_with("http.protect_reads: needs a token"),
        "{errors:?}"
    );
}

#[test]
fn cooldown_defaults_overrides_and_limits() {
    let config = parse(
        "[defaults.cooldown]\nafter = 5\n\
         [plugins.billing]\n[plugins.ledger]\ncooldown = { initial = \"2s\", max = \"10s\" }\n",
    )
    .unwrap();
    let billing = config.plugin_settings("billing").unwrap();
    assert_eq!(billing.cooldown.after, 5);
    assert_eq!(billing.cooldown.initial, Duration::from_secs(1));
    let ledger = config.plugin_settings("ledger").unwrap();
    // A plugin's table replaces the defaults' as a whole, like `backoff`.
    assert_eq!(ledger.cooldown.after, 3);
    assert_eq!(
        (ledger.cooldown.initial, ledger.cooldown.max),
        (Duration::from_secs(2), Duration::from_secs(10))
    );
    let errors = parse(
        "[defaults.cooldown]\ninitial = \"2m\"\nmax = \"1m\"\n\
         [plugins.a.cooldown]\nmax = \"2h\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        errors.contains("defaults.cooldown: initial (2m) is longer than max (1m)"),
        "{errors}"
    );
    assert!(
        errors.contains("plugins.a.cooldown.max: must be between"),
        "{errors}"
    );
}

// --- Hostile files ------------------------------------------------------------------

/// The passwords in the URLs of [`FULL`] (broker, Redis): no error may ever
/// show them.
const PASSWORDS: [&str; 2] = ["Zq8Xv3Kp", "Wm4Rt7Yh"];

/// Every section, with a secret in each place that takes one.
const FULL: &str = r##"plugins_dir = "plugins"
[broker]
url = "amqp://app:Zq8Xv3Kp@rabbit:5672/%2f"
queue_type = "classic"
unroutable = "dead-letter"
timeout = "5s"
[kv]
backend = "redis"
url = "redis://:Wm4Rt7Yh@cache:6379/0"
pool_size = 16
[http]
listen = "0.0.0.0:8080"
token = "0123456789abcdef0123"
protect_reads = true
[runtime]
max_instances = 4
max_stack = "1MiB"
[defaults]
prefetch = 8
memory = "32MiB"
max_attempts = 3
[defaults.backoff]
initial = "100ms"
multiplier = 3.0
[[exchanges]]
name = "events"
kind = "topic"
[[exchanges]]
name = "audit"
kind = "fanout"
[plugins.billing]
output_exchange = "events"
dedupe = "10m"
backoff = { initial = "1s", max = "1m" }
[plugins.audit]
enabled = false
config = { forward = "false" }
[[routes]]
exchange = "events"
pattern = "payment.*"
plugin = "billing"
[[routes]]
exchange = "audit"
patterns = ["#"]
plugin = "audit"
"##;

/// Values that sit on the edges of the types the schema uses.
const EDGE_VALUES: &[&str] = &[
    "\"\"",
    "0",
    "-1",
    "65536",
    "4294967296",
    "18446744073709551615",
    "1e309",
    "nan",
    "true",
    "[]",
    "{}",
    "\"0s\"",
    "\"99999999999999h\"",
    "\"-1MiB\"",
    "\"18446744073709551615B\"",
    "\"amq.x\"",
    "\"a b\"",
    "\"amqp://\"",
    "\"redis://cache:99999\"",
];

/// How each validation problem starts: a key of the file, or the environment
/// variable that set it.
const KEY_ROOTS: &[&str] = &[
    "broker.",
    "kv.",
    "http.",
    "archive.",
    "runtime.",
    "defaults.",
    "exchanges[",
    "plugins.",
    "routes[",
    "RABBITMQ_",
    "REDIS_",
    "SWITCHBOARD_",
];

/// One edit of a file, by line, the way files get broken by hand.
#[derive(Debug, Clone)]
enum Edit {
    Drop(prop::sample::Index),
    Repeat(prop::sample::Index, prop::sample::Index),
    Swap(prop::sample::Index, prop::sample::Index),
    /// The value after `=` replaced by one of [`EDGE_VALUES`].
    Revalue(prop::sample::Index, prop::sample::Index),
    /// The line cut after this many characters.
    Truncate(prop::sample::Index, prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    use prop::sample::Index;
    prop_oneof![
        any::<Index>().prop_map(Edit::Drop),
        any::<(Index, Index)>().prop_map(|(a, b)| Edit::Repeat(a, b)),
        any::<(Index, Index)>().prop_map(|(a, b)| Edit::Swap(a, b)),
        any::<(Index, Index)>().prop_map(|(a, b)| Edit::Revalue(a, b)),
        any::<(Index, Index)>().prop_map(|(a, b)| Edit::Truncate(a, b)),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for edit in edits {
        if lines.is_empty() {
            break;
        }
        match edit {
            Edit::Drop(at) => {
                lines.remove(at.index(lines.len()));
            }
            Edit::Repeat(at, to) => {
                let line = lines[at.index(lines.len())].clone();
                lines.insert(to.index(lines.len() + 1), line);
            }
            Edit::Swap(a, b) => {
                let (a, b) = (a.index(lines.len()), b.index(lines.len()));
                lines.swap(a, b);
            }
            Edit::Revalue(at, value) => {
                let at = at.index(lines.len());
                if let Some((key, _)) = lines[at].split_once('=') {
                    lines[at] = format!("{key}= {}", value.get(EDGE_VALUES));
                }
            }
            Edit::Truncate(at, cut) => {
                let at = at.index(lines.len());
                let line = &mut lines[at];
                let keep = cut.index(line.chars().count() + 1);
                *line = line.chars().take(keep).collect();
            }
        }
    }
    lines.join("\n")
}

/// The passwords of [`PASSWORDS`] still where a secret goes: once in the file,
/// in the credentials of a URL as TOML reads it.
fn passwords_in_urls(text: &str) -> Vec<&'static str> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let credentials: Vec<&str> = ["broker", "kv"]
        .iter()
        .filter_map(|section| table.get(*section)?.get("url")?.as_str())
        .filter_map(|url| {
            let (_, rest) = url.split_once("://")?;
            rest.rfind('@').map(|at| &rest[..at])
        })
        .collect();
    PASSWORDS
        .into_iter()
        .filter(|p| text.matches(p).count() == 1 && credentials.iter().any(|c| c.contains(p)))
        .collect()
}

/// What every outcome of parsing `text` must be: a configuration, a parse error
/// at a line of the file with a message, or problems that each name their key,
/// and never the password.
fn parses_or_says_where(text: &str) -> Result<(), TestCaseError> {
    let error = match parse(text) {
        Ok(config) => {
            let debug = format!("{config:?}");
            prop_assert!(PASSWORDS.iter().all(|p| !debug.contains(p)), "{}", debug);
            return Ok(());
        }
        Err(error) => error,
    };
    match &error {
        ConfigError::Parse {
            line,
            column,
            message,
            ..
        } => {
            let lines = text.split('\n').count();
            prop_assert!((1..=lines).contains(line), "line {} of {}", line, lines);
            prop_assert!(*column >= 1);
            prop_assert!(!message.trim().is_empty());
        }
        ConfigError::Invalid { errors, .. } => {
            prop_assert!(!errors.is_empty());
            for problem in errors {
                let (key, what) = problem.split_once(": ").unwrap_or(("", ""));
                prop_assert!(
                    KEY_ROOTS.iter().any(|root| key.starts_with(root)) && !what.trim().is_empty(),
                    "{:?}",
                    problem
                );
            }
        }
        ConfigError::Read { .. } => prop_assert!(false, "read a file: {}", error),
    }
    let shown = error.to_string();
    for password in passwords_in_urls(text) {
        prop_assert!(!shown.contains(password), "{}", shown);
    }
    Ok(())
}

#[test]
fn the_full_example_is_valid_and_hides_its_passwords() {
    let config = parse(FULL).unwrap();
    assert_eq!(config.plugins.len(), 2);
    assert_eq!(passwords_in_urls(FULL), PASSWORDS);
    let debug = format!("{config:?}");
    assert!(PASSWORDS.iter().all(|p| !debug.contains(p)), "{debug}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_text_parses_or_says_where_it_is_wrong(text in any::<String>()) {
        parses_or_says_where(&text)?;
    }

    #[test]
    fn toml_shaped_text_parses_or_says_where_it_is_wrong(
        text in "(\\[{1,2}[a-z_.]{0,12}\\]{1,2}\n|[a-z_]{1,14} = (\"[ -~]{0,12}\"|-?[0-9]{1,20}|true|\\[\\]|\\{\\})\n){0,12}",
    ) {
        parses_or_says_where(&text)?;
    }

    #[test]
    fn edited_configurations_parse_or_name_what_is_wrong(
        full in any::<bool>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let text = apply(if full { FULL } else { SHIPPED }, &edits);
        parses_or_says_where(&text)?;
    }
}

#[test]
fn the_consumer_settings_services_carry_set_the_defaults_the_file_leaves_out() {
    let vars = [
        ("RABBITMQ_PREFETCH", "25"),
        ("RABBITMQ_RETRY_COUNT", "3"),
        ("RABBITMQ_RETRY_DELAY", "120000"),
    ];
    let mut config = parse("").unwrap();
    config.apply_env(env(&vars));
    assert_eq!(config.defaults.prefetch, 25);
    assert_eq!(
        config.defaults.max_attempts, 4,
        "three retries after the first attempt"
    );
    assert_eq!(config.defaults.backoff.initial, Duration::from_secs(120));
    assert_eq!(
        config.defaults.backoff.max,
        Duration::from_secs(120),
        "max grows to the delay"
    );
    assert!(config.validate().is_ok());

    // What router.toml says wins, key by key.
    let mut config =
        parse("[defaults]\nprefetch = 10\n[defaults.backoff]\ninitial = \"1s\"\nmax = \"5m\"\n")
            .unwrap();
    config.apply_env(env(&vars));
    assert_eq!(config.defaults.prefetch, 10);
    assert_eq!(
        config.defaults.max_attempts, 4,
        "the file leaves max_attempts out"
    );
    assert_eq!(config.defaults.backoff.initial, Duration::from_secs(1));
    assert_eq!(config.defaults.backoff.max, Duration::from_secs(300));

    // Garbage is reported, naming the variable.
    let mut config = parse("").unwrap();
    config.apply_env(env(&[
        ("RABBITMQ_PREFETCH", "lots"),
        ("RABBITMQ_RETRY_DELAY", "-1"),
    ]));
    let errors = config.validate().unwrap_err().join("\n");
    assert!(
        errors.contains("RABBITMQ_PREFETCH: not a whole number"),
        "{errors}"
    );
    assert!(
        errors.contains("RABBITMQ_RETRY_DELAY: not a whole number"),
        "{errors}"
    );
}

#[test]
fn rabbitmq_pass_is_the_password_when_rabbitmq_password_is_not_set() {
    let mut config = parse("").unwrap();
    config.apply_env(env(&[
        ("RABBITMQ_HOST", "rabbit"),
        ("RABBITMQ_PASS", "s3cret"),
    ]));
    assert_eq!(
        config.broker.url.as_ref().unwrap().expose(),
        "amqp://guest:s3cret@rabbit:5672/%2f"
    );
    let mut config = parse("").unwrap();
    config.apply_env(env(&[
        ("RABBITMQ_HOST", "rabbit"),
        ("RABBITMQ_PASS", "old"),
        ("RABBITMQ_PASSWORD", "new"),
    ]));
    assert_eq!(
        config.broker.url.as_ref().unwrap().expose(),
        "amqp://guest:new@rabbit:5672/%2f"
    );
}

#[test]
fn dead_letter_retention_comes_from_the_file_or_rabbitmq_dlq_ttl() {
    let mut config = parse("").unwrap();
    assert_eq!(
        (config.broker.dlq_ttl, config.broker.dlq_max_length),
        (None, None)
    );
    config.apply_env(env(&[("RABBITMQ_DLQ_TTL", "86400000")]));
    assert_eq!(config.broker.dlq_ttl, Some(Duration::from_secs(86_400)));
    assert!(config.validate().is_ok());

    // The file wins.
    let mut config = parse("[broker]\ndlq_ttl = \"7d\"\ndlq_max_length = 5000\n").unwrap();
    config.apply_env(env(&[("RABBITMQ_DLQ_TTL", "1000")]));
    assert_eq!(config.broker.dlq_ttl, Some(Duration::from_secs(7 * 86_400)));
    assert_eq!(config.broker.dlq_max_length, Some(5000));
    assert!(config.validate().is_ok());

    // Out of range, zero, and garbage are each named.
    let errors = problems("[broker]\ndlq_ttl = \"60d\"\ndlq_max_length = 0\n").join("\n");
    assert!(
        errors.contains("broker.dlq_ttl: must be between 1s and 49d"),
        "{errors}"
    );
    assert!(
        errors.contains("broker.dlq_max_length: must be at least 1"),
        "{errors}"
    );
    let mut config = parse("").unwrap();
    config.apply_env(env(&[("RABBITMQ_DLQ_TTL", "7d")]));
    let errors = config.validate().unwrap_err().join("\n");
    assert!(
        errors.contains("RABBITMQ_DLQ_TTL: not a whole number of milliseconds"),
        "{errors}"
    );
}

// --- Broker kind (issue 21: Redis Streams) ------------------------------------------

#[test]
fn the_broker_kind_is_inferred_from_an_amqp_url_and_explicit_for_redis() {
    let config = parse("").unwrap();
    assert_eq!(config.broker.bus_kind(), Ok(BrokerKind::Embedded));
    assert_eq!(config.broker.claim_idle, Duration::from_secs(30));
    assert_eq!(config.broker.stream_max_length, 1_000_000);

    let config = parse("[broker]\nurl = \"amqp://localhost\"\n").unwrap();
    assert_eq!(config.broker.kind, None, "existing configs keep working");
    assert_eq!(config.broker.bus_kind(), Ok(BrokerKind::RabbitMq));

    let config = parse(
        "[broker]\nkind = \"redis-streams\"\nurl = \"redis://cache:6379/1\"\n\
         claim_idle = \"45s\"\nstream_max_length = 5000\n",
    )
    .unwrap();
    assert_eq!(config.broker.bus_kind(), Ok(BrokerKind::RedisStreams));
    assert_eq!(config.broker.claim_idle, Duration::from_secs(45));
    assert_eq!(config.broker.stream_max_length, 5000);

    let config = parse("[broker]\nkind = \"rabbitmq\"\nurl = \"amqps://h/v\"\n").unwrap();
    assert_eq!(config.broker.bus_kind(), Ok(BrokerKind::RabbitMq));
    let config = parse("[broker]\nkind = \"embedded\"\n").unwrap();
    assert_eq!(config.broker.bus_kind(), Ok(BrokerKind::Embedded));
}

#[test]
fn a_redis_url_without_kind_or_a_contradicting_kind_is_a_config_error() {
    let errors = problems("[broker]\nurl = \"redis://:s3cret@cache:6379\"\n");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("needs kind = \"redis-streams\""),
        "{errors:?}"
    );
    assert!(!errors[0].contains("s3cret"), "{errors:?}");

    let errors = problems("[broker]\nkind = \"redis-streams\"\nurl = \"amqp://h\"\n");
    assert!(
        errors[0].starts_with("broker.kind: \"redis-streams\" contradicts broker.url"),
        "{errors:?}"
    );
    let errors = problems("[broker]\nkind = \"rabbitmq\"\nurl = \"redis://h\"\n");
    assert!(errors[0].contains("contradicts"), "{errors:?}");
    let errors = problems("[broker]\nkind = \"embedded\"\nurl = \"amqp://h\"\n");
    assert!(errors[0].contains("takes no url"), "{errors:?}");
    let errors = problems("[broker]\nkind = \"redis-streams\"\n");
    assert!(
        errors[0].contains("needs broker.url (redis://…) or REDIS_BUS_URL"),
        "{errors:?}"
    );
    let errors = problems("[broker]\nkind = \"redis-streams\"\nurl = \"http://h\"\n");
    assert!(
        errors[0].contains("expected a redis:// or rediss:// URL"),
        "{errors:?}"
    );
    let (_, _, message) = parse_error("[broker]\nkind = \"kafka\"\n");
    assert!(message.contains("redis-streams"), "{message}");
}

#[test]
fn redis_bus_settings_are_checked() {
    let errors = problems(
        "[broker]\nkind = \"redis-streams\"\nurl = \"redis://h\"\nclaim_idle = \"10ms\"\n\
         stream_max_length = 10\n",
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("broker.claim_idle: "), "{errors:?}");
    assert!(
        errors[1].starts_with("broker.stream_max_length: "),
        "{errors:?}"
    );
}

#[test]
fn redis_bus_url_applies_only_to_the_redis_streams_kind() {
    let vars = [
        ("REDIS_BUS_URL", "redis://bus:6379/2"),
        ("RABBITMQ_URL", "amqp://rabbit"),
        ("REDIS_URL", "redis://kv:6379/0"),
    ];
    let mut config = parse("[broker]\nkind = \"redis-streams\"\nurl = \"redis://file\"\n").unwrap();
    config.apply_env(env(&vars));
    assert_eq!(
        config.broker.url.as_ref().unwrap().expose(),
        "redis://bus:6379/2",
        "REDIS_BUS_URL, not RABBITMQ_URL nor REDIS_URL"
    );
    assert_eq!(config.broker.bus_kind(), Ok(BrokerKind::RedisStreams));
    assert!(config.validate().is_ok());

    // Without kind, REDIS_BUS_URL chooses nothing; RABBITMQ_URL still does.
    let mut config = parse("").unwrap();
    config.apply_env(env(&vars));
    assert_eq!(
        config.broker.url.as_ref().unwrap().expose(),
        "amqp://rabbit"
    );
    let mut config = parse("").unwrap();
    config.apply_env(env(&[("REDIS_BUS_URL", "redis://bus")]));
    assert!(config.broker.url.is_none());
    assert_eq!(config.broker.bus_kind(), Ok(BrokerKind::Embedded));

    // An explicit embedded bus ignores RABBITMQ_URL.
    let mut config = parse("[broker]\nkind = \"embedded\"\n").unwrap();
    config.apply_env(env(&vars));
    assert!(config.broker.url.is_none());

    // kind = "redis-streams" with its URL only in the environment.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router.toml");
    std::fs::write(&path, "[broker]\nkind = \"redis-streams\"\n").unwrap();
    let mut config = RouterConfig::load_unvalidated(&path).unwrap();
    config.apply_env(env(&vars));
    assert_eq!(
        config.broker.url.as_ref().unwrap().expose(),
        "redis://bus:6379/2"
    );
    assert!(config.validate().is_ok());
}
