//! The `packet-ingest` binary: set up logging (and tracing), parse and check
//! the configuration (exit 64 if it cannot be used), then run the server or a
//! tool.

use clap::Parser;
use packet_ingest::{
    config::{Cli, Command, Settings, EXIT_CONFIG},
    server, telemetry, tools,
};

/// What this invocation does.
// Built once per process: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Run {
    Serve(Settings),
    Tool(Command),
}

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
    // The runtime exists (idle) before the configuration is checked only so
    // that the trace exporter can be set up inside it.
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("packet-ingest: cannot start the runtime: {error}");
            std::process::exit(1);
        }
    };
    let otlp = match cli.command {
        None => cli.serve.otlp_endpoint.as_deref(),
        Some(_) => None,
    };
    let telemetry = {
        let _inside = runtime.enter();
        match telemetry::init(cli.serve.log_format, otlp) {
            Ok(telemetry) => telemetry,
            Err(error) => {
                eprintln!("packet-ingest: {error}");
                std::process::exit(EXIT_CONFIG);
            }
        }
    };
    // Configuration is checked before anything starts: exit 64 is decided here.
    let run = match cli.command {
        Some(command) => Run::Tool(command),
        None => match Settings::load(cli.serve) {
            Ok(settings) => Run::Serve(settings),
            Err(error) => {
                eprintln!("packet-ingest: {error}");
                std::process::exit(EXIT_CONFIG);
            }
        },
    };
    let code = runtime.block_on(async move {
        match run {
            Run::Serve(settings) => serve(settings).await,
            Run::Tool(Command::Send(args)) => report(tools::send(args).await.map(|()| true)),
            Run::Tool(Command::Tail(args)) => report(tools::tail(args).await.map(|()| true)),
            Run::Tool(Command::Health(args)) => report(tools::health(args).await),
        }
    });
    telemetry.shutdown();
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

async fn serve(settings: Settings) -> i32 {
    let running = match server::start(settings).await {
        Ok(running) => running,
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
