//! The `packet-ingest` binary: parse configuration, set up logging, run.

use clap::Parser;
use packet_ingest::{
    config::{Cli, Command, LogFormat, EXIT_CONFIG},
    server::{self, StartError},
    tools,
};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = error.print();
                std::process::exit(0);
            }
            // One line, as the contract asks, not clap's multi-line usage block.
            let message = error.to_string();
            let line = message.lines().next().unwrap_or("invalid configuration");
            eprintln!("packet-ingest: {}", line.trim_start_matches("error: "));
            std::process::exit(EXIT_CONFIG);
        }
    };
    init_tracing(cli.serve.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("packet-ingest: cannot start the runtime: {error}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            None => serve(cli.serve).await,
            Some(Command::Send(args)) => report(tools::send(args).await.map(|()| true)),
            Some(Command::Tail(args)) => report(tools::tail(args).await.map(|()| true)),
            Some(Command::Health(args)) => report(tools::health(args).await),
        }
    });
    std::process::exit(code);
}

fn report(result: Result<bool, packet_ingest_protocol::client::ToolError>) -> i32 {
    match result {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(error) => {
            eprintln!("packet-ingest: {error}");
            1
        }
    }
}

async fn serve(args: packet_ingest::config::ServeArgs) -> i32 {
    let running = match server::start(args).await {
        Ok(running) => running,
        Err(StartError::Config(error)) => {
            eprintln!("packet-ingest: {error}");
            return EXIT_CONFIG;
        }
        Err(error) => {
            eprintln!("packet-ingest: {error}");
            return 1;
        }
    };
    wait_for_signal().await;
    running.shutdown();
    running.wait().await;
    0
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
