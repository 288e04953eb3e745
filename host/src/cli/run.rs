//! `switchboard run`: the appliance, its HTTP interface and its watcher, until
//! SIGTERM or SIGINT. Then: ingress stops (503, streams end), queued and
//! in-flight events finish (bounded), workers stop, what still waits is spooled
//! to the state folder, and the process exits 0.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::admin;
use crate::appliance::Appliance;
use crate::config::RouterConfig;
use crate::watch;

/// Serves `appliance` over HTTP on `listener` until `shutdown` resolves, then
/// stops ingress and waits for in-flight requests. Does not drain the bus.
pub async fn serve(
    appliance: Appliance,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = admin::router(appliance.clone());
    let stopping = appliance.clone();
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stopping.stop_ingress();
        })
        .await
        .context("HTTP server failed")
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A plugin whose file is there but does not load stops the start, with one
/// line naming it and why: a deployment with a broken plugin fails where it is
/// made (a container that exits, a rollout that halts) instead of running
/// without that plugin. A file not there yet is waited for, as before; a
/// broken file arriving later, once running, is refused and the rest serve.
fn refuse_broken_plugins(appliance: &Appliance, drain_timeout: Duration) -> anyhow::Result<()> {
    let broken: Vec<String> = appliance
        .statuses()
        .into_iter()
        .filter(|s| s.state == crate::appliance::PluginState::Failed)
        .map(|s| match s.error {
            // The load error names the plugin already.
            Some(error) => format!("{error} ({})", s.file.display()),
            None => format!("plugin {:?} ({}) did not start", s.name, s.file.display()),
        })
        .collect();
    if broken.is_empty() {
        return Ok(());
    }
    appliance.shutdown(drain_timeout)?;
    anyhow::bail!(
        "{}; not starting with a broken plugin (fix or replace the file, or set enabled = false; \
         `switchboard check` lists every problem)",
        broken.join("; ")
    )
}

/// Runs until a signal; `Ok` after a clean shutdown.
pub fn run(config_path: &Path, drain_timeout: Duration) -> anyhow::Result<()> {
    let config = RouterConfig::load(config_path)?;
    let transport = match (config.broker.bus_kind(), &config.broker.url) {
        (Ok(crate::config::BrokerKind::RedisStreams), Some(url)) => {
            format!("Redis Streams at {url}")
        }
        (_, Some(url)) => format!("RabbitMQ at {url}"),
        (_, None) => "the embedded bus".to_string(),
    };
    let listen = config.http.listen;
    let appliance = Appliance::start(config)?;
    refuse_broken_plugins(&appliance, drain_timeout)?;
    let watcher = watch::start(appliance.clone(), config_path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let local = listener.local_addr()?;
        tracing::info!(listen = %local, "switchboard is running on {transport}");
        serve(appliance.clone(), listener, signal()).await
    })?;
    tracing::info!("shutting down: finishing queued and in-flight events");
    drop(watcher);
    let spooled = appliance.shutdown(drain_timeout)?;
    if spooled > 0 {
        tracing::info!(
            spooled,
            "events still waiting (retries) were spooled; the next start resumes them"
        );
    }
    tracing::info!("stopped");
    Ok(())
}
