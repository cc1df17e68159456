//! The `shoal` binary: parse flags, start the node, wait for a signal, shut down in order.

use std::process::ExitCode;

use clap::Parser;
use shoal_node::config::{Cli, Command};
use shoal_node::Node;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("SHOAL_LOG").unwrap_or_else(|_| {
        EnvFilter::new(if matches!(cli.command, Command::Demo(_)) {
            "warn"
        } else {
            "info"
        })
    });
    // SHOAL_LOG_FORMAT=json gives one JSON object per line, for log pipelines.
    if std::env::var("SHOAL_LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_target(false)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_target(false)
            .init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.command {
        Command::Run(args) => runtime.block_on(run(*args)),
        Command::Demo(args) => runtime.block_on(demo(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: shoal_node::config::RunArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let node = Node::start(config).await?;
    wait_for_signal().await;
    node.shutdown().await;
    Ok(())
}

async fn demo(args: shoal_node::config::DemoArgs) -> anyhow::Result<()> {
    let layer_size = shoal_node::config::parse_size(&args.layer_size)
        .map_err(|e| anyhow::anyhow!("invalid --layer-size {:?}: {e}", args.layer_size))?;
    anyhow::ensure!(layer_size <= 1 << 30, "--layer-size must be at most 1GiB");
    let opts = shoal_node::demo::DemoOptions {
        nodes: args.nodes,
        layers: args.layers,
        layer_size: layer_size as usize,
    };
    shoal_node::demo::run(opts).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
