//! The commands that talk to the broker directly (RabbitMQ or Redis
//! Streams): `publish`, `tail` and `dlq list|redrive`. They read the broker
//! URL and prefix from router.toml (and the environment: `RABBITMQ_URL` & co.,
//! `REDIS_BUS_URL`), open their own connection and close it when done.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};

use crate::bus::rabbit::{Names, RabbitSettings, connect, describe, is_not_found, tools};
use crate::bus::redis::{self as redis_bus, Keys, Link, RedisBusSettings};
use crate::config::RouterConfig;
use crate::envelope;

/// Where the broker is.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// The configuration file: its `[broker]` table (with `RABBITMQ_URL` and
    /// the other `RABBITMQ_*` variables applied) says where the broker is.
    #[arg(long, default_value = "router.toml", env = "SWITCHBOARD_CONFIG")]
    pub config: PathBuf,
}

/// `switchboard publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The exchange to publish to.
    pub exchange: String,
    /// The routing key (the event type, for topic exchanges).
    pub routing_key: String,
    /// The event: a JSON envelope (`{"type": …, "data": …}`), a CloudEvent, or
    /// any JSON; `-` reads it from standard input.
    pub body: String,
    /// Content type of the body.
    #[arg(long, default_value = "application/json")]
    pub content_type: String,
}

/// `switchboard tail`.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The exchange to watch.
    pub exchange: String,
    /// Topic pattern of the routing keys to show (`#`: all).
    #[arg(default_value = "#")]
    pub pattern: String,
    /// Stop after this many messages.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Stop after this long (`30s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

/// `switchboard dlq …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// Print a plugin's dead letters, one JSON line each, with the reason; they
    /// stay in the dead-letter queue.
    List {
        #[command(flatten)]
        broker: BrokerArgs,
        /// The plugin.
        plugin: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Move a plugin's dead letters back to its queue, attempts reset.
    Redrive {
        #[command(flatten)]
        broker: BrokerArgs,
        /// The plugin.
        plugin: String,
        /// Move at most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
}

fn config(args: &BrokerArgs) -> anyhow::Result<RouterConfig> {
    Ok(if args.config.exists() {
        RouterConfig::load(&args.config)?
    } else {
        let mut config = RouterConfig::default();
        config.apply_env(|k| std::env::var(k).ok());
        config
            .validate()
            .map_err(|errors| anyhow::anyhow!("{}", errors.join("; ")))?;
        config
    })
}

/// The Redis Streams bus the configuration chooses, if it does: a pool and
/// the key names.
fn redis(args: &BrokerArgs) -> anyhow::Result<Option<(RedisBusSettings, Link, Keys)>> {
    let Some(settings) = RedisBusSettings::from_config(&config(args)?) else {
        return Ok(None);
    };
    let link = Link::new(&settings.url, settings.timeout, 2).map_err(anyhow::Error::msg)?;
    let keys = Keys::new(&settings.prefix);
    Ok(Some((settings, link, keys)))
}

fn settings(args: &BrokerArgs) -> anyhow::Result<RabbitSettings> {
    let config = config(args)?;
    RabbitSettings::from_config(&config).with_context(|| {
        format!(
            "no broker is configured: set [broker] url in {} or RABBITMQ_URL",
            args.config.display()
        )
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn read_body(body: &str) -> anyhow::Result<Vec<u8>> {
    if body == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)?;
        Ok(bytes)
    } else {
        Ok(body.as_bytes().to_vec())
    }
}

/// Publishes one event (confirmed) and prints its id; exit 1 when no queue
/// was bound for it.
pub fn publish(args: &PublishArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    if let Some((settings, link, keys)) = redis(&args.broker)? {
        let body = read_body(&args.body)?;
        let (message, id) =
            envelope::ingress_message(&args.routing_key, &body, Some(&args.content_type))?;
        let routed = redis_bus::tools::publish_one(
            &link,
            &keys,
            &args.exchange,
            &args.routing_key,
            &message,
            settings.stream_max_length,
        )
        .map_err(|e| match e {
            crate::bus::BusError::NoSuchExchange(x) => anyhow::anyhow!(
                "exchange {x:?} is not declared on the Redis bus (prefix {:?}; has a router with this configuration started?)",
                settings.prefix
            ),
            e => anyhow::anyhow!("cannot publish to exchange {:?}: {e}", args.exchange),
        })?;
        return published(args, out, &id, routed);
    }
    let settings = settings(&args.broker)?;
    let body = read_body(&args.body)?;
    let (message, id) =
        envelope::ingress_message(&args.routing_key, &body, Some(&args.content_type))?;
    // One sentence per failure: a lapin error's chain repeats the broker's text.
    let failed = |e: lapin::Error| {
        if is_not_found(&e) {
            anyhow::anyhow!("exchange {:?} does not exist on the broker", args.exchange)
        } else {
            anyhow::anyhow!(
                "cannot publish to exchange {:?}: {}",
                args.exchange,
                settings.url.scrub(&describe(&e))
            )
        }
    };
    let routed = runtime()?.block_on(async {
        let connection = connect(&settings, "switchboard publish")
            .await
            .map_err(anyhow::Error::msg)?;
        let channel = connection.create_channel().await.map_err(failed)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(failed)?;
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(ct) = &message.content_type {
            properties = properties.with_content_type(ct.as_str().into());
        }
        if let Some(mid) = &message.message_id {
            properties = properties.with_message_id(mid.as_str().into());
        }
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = channel
            .basic_publish(
                args.exchange.as_str().into(),
                args.routing_key.as_str().into(),
                options,
                &message.body,
                properties,
            )
            .await
            .map_err(failed)?;
        let confirmed = tokio::time::timeout(settings.timeout, confirm)
            .await
            .context("the broker did not confirm the publish in time")?
            .map_err(failed)?;
        let _ = connection.close(200, "published".into()).await;
        match confirmed {
            Confirmation::Ack(returned) => Ok::<bool, anyhow::Error>(returned.is_none()),
            Confirmation::NotRequested => Ok(true),
            Confirmation::Nack(_) => bail!("the broker refused the message"),
        }
    })?;
    published(args, out, &id, routed)
}

/// Prints what `publish` did; exit 1 when no route took the event.
fn published(
    args: &PublishArgs,
    out: &mut dyn Write,
    id: &str,
    routed: bool,
) -> anyhow::Result<i32> {
    writeln!(out, "{}", serde_json::json!({"id": id, "routed": routed}))?;
    if routed {
        Ok(0)
    } else {
        eprintln!(
            "switchboard: no queue is bound to exchange {:?} for routing key {:?}; the event was dropped",
            args.exchange, args.routing_key
        );
        Ok(1)
    }
}

fn message_json(published: &crate::bus::Published) -> serde_json::Value {
    use base64::Engine as _;
    let body = &published.message.body;
    let message = serde_json::from_slice::<serde_json::Value>(body).unwrap_or_else(|_| {
        serde_json::json!({"body_base64": base64::engine::general_purpose::STANDARD.encode(body)})
    });
    let headers: serde_json::Map<String, serde_json::Value> = published
        .message
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "exchange": published.exchange,
        "routing_key": published.routing_key,
        "content_type": published.message.content_type,
        "headers": headers,
        "message": message,
    })
}

/// Prints what is published on an exchange, one JSON line per message, until
/// Ctrl-C, `--limit` or `--duration`.
pub fn tail(args: &TailArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    if let Some((_, link, keys)) = redis(&args.broker)? {
        eprintln!(
            "switchboard: watching exchange {:?} for {:?}",
            args.exchange, args.pattern
        );
        let until = args.duration.map(|d| std::time::Instant::now() + d);
        let mut left = args.limit.unwrap_or(usize::MAX);
        let mut failed = None;
        if left > 0 {
            redis_bus::tools::tail(&link, &keys, &args.exchange, &args.pattern, until, |p| {
                if let Err(e) = writeln!(out, "{}", message_json(&p)).and_then(|()| out.flush()) {
                    failed = Some(e);
                    return false;
                }
                left -= 1;
                left > 0
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if let Some(e) = failed {
            return Err(e.into());
        }
        return Ok(0);
    }
    let settings = settings(&args.broker)?;
    runtime()?.block_on(async {
        let connection = connect(&settings, "switchboard tail").await.map_err(anyhow::Error::msg)?;
        let stream = tools::tail(&connection, &args.exchange, &args.pattern)
            .await
            .map_err(anyhow::Error::msg)?;
        eprintln!("switchboard: watching exchange {:?} for {:?}", args.exchange, args.pattern);
        let stream = stream.take(args.limit.unwrap_or(usize::MAX));
        let until = async {
            match args.duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let mut stream = std::pin::pin!(stream.take_until(Box::pin(until)));
        let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
        loop {
            tokio::select! {
                next = stream.next() => match next {
                    Some(Ok(published)) => {
                        writeln!(out, "{}", message_json(&published))?;
                        out.flush()?;
                    }
                    Some(Err(e)) => bail!("the broker connection failed: {}", settings.url.scrub(&e)),
                    None => break,
                },
                _ = &mut interrupted => break,
            }
        }
        let _ = connection.close(200, "tail done".into()).await;
        Ok(0)
    })
}

/// `switchboard dlq list|redrive`.
pub fn dlq(command: &DlqCommand, out: &mut dyn Write) -> anyhow::Result<i32> {
    let (broker, plugin) = match command {
        DlqCommand::List { broker, plugin, .. } | DlqCommand::Redrive { broker, plugin, .. } => {
            (broker, plugin)
        }
    };
    if let Some((settings, link, keys)) = redis(broker)? {
        let known = redis_bus::tools::knows_plugin(&link, &keys, plugin)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !known {
            bail!(
                "there is no dead-letter stream nor stream for plugin {plugin:?} (is it a configured plugin, and the prefix {:?}?)",
                settings.prefix
            );
        }
        match command {
            DlqCommand::List { limit, .. } => {
                for letter in redis_bus::tools::peek(&link, &keys, plugin, *limit)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                {
                    writeln!(out, "{}", letter.to_json())?;
                }
            }
            DlqCommand::Redrive { limit, .. } => {
                let moved = redis_bus::tools::redrive(
                    &link,
                    &keys,
                    plugin,
                    limit.unwrap_or(usize::MAX),
                    settings.stream_max_length,
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                writeln!(out, "{}", serde_json::json!({"redriven": moved}))?;
            }
        }
        return Ok(0);
    }
    let settings = settings(broker)?;
    let names = Names::new(&settings.prefix);
    runtime()?.block_on(async {
        let connection = connect(&settings, "switchboard dlq").await.map_err(anyhow::Error::msg)?;
        let queue = names.dlq(plugin);
        if tools::depth(&connection, &queue).await.map_err(anyhow::Error::msg)?.is_none() {
            bail!("there is no dead-letter queue {queue:?} (is {plugin:?} a configured plugin, and the prefix {:?}?)", settings.prefix);
        }
        match command {
            DlqCommand::List { limit, .. } => {
                for letter in tools::peek(&connection, &queue, *limit).await.map_err(anyhow::Error::msg)? {
                    writeln!(out, "{}", letter.to_json())?;
                }
            }
            DlqCommand::Redrive { limit, .. } => {
                let moved = tools::redrive(&connection, &names, plugin, limit.unwrap_or(usize::MAX), settings.timeout)
                    .await
                    .map_err(anyhow::Error::msg)?;
                writeln!(out, "{}", serde_json::json!({"redriven": moved}))?;
            }
        }
        let _ = connection.close(200, "done".into()).await;
        Ok(0)
    })
}
