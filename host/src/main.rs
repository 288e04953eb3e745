//! The `switchboard` command.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use switchboard::cli;

/// WebAssembly-plugin event router.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "SWITCHBOARD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the appliance with router.toml: consume, route, run plugins, publish,
    /// with hot reload, until SIGTERM or SIGINT (then drain and exit 0).
    Run {
        /// The configuration file.
        #[arg(long, default_value = "router.toml", env = "SWITCHBOARD_CONFIG")]
        config: PathBuf,
        /// How long queued and in-flight events may take to finish at shutdown.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
    },
    /// Validate router.toml, compile every enabled plugin and print the route
    /// table; exits 0 when all is well, 1 on any problem, 2 when the file cannot
    /// be read or parsed.
    Check(cli::check::CheckArgs),
    /// Run a plugin offline over recorded events (JSONL envelopes) and print what
    /// it produced, one JSON line per event; compare with a golden file.
    Test(cli::test::TestArgs),
    /// Scaffold a plugin (Rust, Python or JavaScript) that builds and passes its
    /// own golden test: the contract, a handler, a Makefile, sample events.
    New(cli::new::NewArgs),
    /// Publish one event to an exchange on the broker (confirmed) and print its
    /// id; exits 1 when no queue is bound for it.
    Publish(cli::broker::PublishArgs),
    /// Print what is published on an exchange of the broker, one JSON line per
    /// message, until Ctrl-C.
    Tail(cli::broker::TailArgs),
    /// Print archived events (`[archive]`) as JSON lines, oldest first.
    Events(cli::events::EventsArgs),
    /// Run archived events again through a plugin: offline (--dry-run), against
    /// a candidate (--diff), to rebuild one aggregate's state (--rebuild), or
    /// re-delivered to its queue (--publish).
    Replay(cli::replay::ReplayArgs),
    /// Read a plugin's kv state.
    #[command(subcommand)]
    Kv(cli::kv::KvCommand),
    /// Inspect and re-drive a plugin's dead-letter queue on the broker.
    #[command(subcommand)]
    Dlq(cli::broker::DlqCommand),
}

fn init_logging(format: LogFormat) {
    // lapin's own lines (an ERROR for every channel the broker closes, a trio
    // of them per failed reconnect, a WARN with the whole message for every
    // return) repeat what Switchboard's say in one sentence: off whatever the
    // level, unless the filter names `lapin` (`SWITCHBOARD_LOG=info,lapin=debug`).
    let filter = cli::log_filter(
        std::env::var("SWITCHBOARD_LOG").ok().as_deref(),
        std::env::var(EnvFilter::DEFAULT_ENV).ok().as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run {
            config,
            drain_timeout,
        } => cli::run::run(&config, drain_timeout).map(|()| 0),
        // Stderr unlocked: log lines go there too, from the threads that
        // compile plugins, and a lock held for the whole command would leave
        // them (and the command, waiting for them) stuck.
        Command::Check(args) => {
            cli::check::run(&args, &mut std::io::stdout().lock(), &mut std::io::stderr())
        }
        Command::Test(args) => {
            cli::test::run(&args, &mut std::io::stdout().lock(), &mut std::io::stderr())
        }
        Command::New(args) => cli::new::run(&args, &mut std::io::stdout().lock()),
        Command::Publish(args) => cli::broker::publish(&args, &mut std::io::stdout().lock()),
        Command::Tail(args) => cli::broker::tail(&args, &mut std::io::stdout().lock()),
        Command::Events(args) => cli::events::run(&args, &mut std::io::stdout().lock()),
        Command::Replay(args) => {
            cli::replay::run(&args, &mut std::io::stdout().lock(), &mut std::io::stderr())
        }
        Command::Kv(command) => cli::kv::run(
            &command,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr(),
        ),
        Command::Dlq(command) => cli::broker::dlq(&command, &mut std::io::stdout().lock()),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("switchboard: {e:#}");
            ExitCode::from(2)
        }
    }
}
