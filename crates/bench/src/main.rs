//! The `packet-ingest-bench` binary: parse the arguments, run, exit 0 when
//! every check passed (1 otherwise, with the reason on stderr).

use clap::Parser;
use packet_ingest_bench::BenchArgs;

#[derive(Debug, Parser)]
#[command(
    name = "packet-ingest-bench",
    version,
    about = "Load generator and checker for packet-ingest (or NATS): producers, subscribers, rates, losses, latency"
)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("packet-ingest-bench: cannot start the runtime: {error}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(packet_ingest_bench::run(cli.args)) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(error) => {
            eprintln!("packet-ingest-bench: {error}");
            1
        }
    };
    std::process::exit(code);
}
