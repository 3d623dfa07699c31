//! The load generator against a real server over loopback sockets: TCP,
//! Publish, large packets, a paced run and compressed streams must each come
//! back complete and in order at every subscriber. It never asserts speed (CI machines are shared).

use clap::Parser;
use packet_ingest::{
    config::{ServeArgs, Settings},
    server,
};
use packet_ingest_bench::BenchArgs;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

async fn bench(server: &server::RunningServer, extra: &[&str]) -> bool {
    let grpc = format!("http://{}", server.grpc_addr);
    let ingest = server.ingest_addr.to_string();
    let mut argv = vec![
        "bench",
        "--grpc-addr",
        &grpc,
        "--ingest-addr",
        &ingest,
        "--quiet",
        "--json",
    ];
    argv.extend_from_slice(extra);
    let args = Cli::try_parse_from(argv)
        .expect("valid bench arguments")
        .args;
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        packet_ingest_bench::run(args),
    )
    .await
    .expect("the bench finishes")
    .expect("the bench runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_are_complete_and_in_order_over_every_path() {
    // Block mode: lossless, so "complete" holds whatever the machine's speed.
    let args = ServeArgs::try_parse_from([
        "packet-ingest",
        "--grpc-addr",
        "127.0.0.1:0",
        "--ingest-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--slow-subscriber",
        "block",
        "--compression",
        "gzip,zstd",
    ])
    .expect("valid server arguments");
    let settings = Settings::load(args).expect("usable configuration");
    let server = server::start(settings).await.expect("server starts");
    let runs: [&[&str]; 6] = [
        &[
            "--producers",
            "2",
            "--subscribers",
            "2",
            "--count",
            "2000",
            "--size",
            "64",
        ],
        &[
            "--producers",
            "2",
            "--subscribers",
            "2",
            "--count",
            "2000",
            "--size",
            "64",
            "--via",
            "publish",
        ],
        &[
            "--producers",
            "2",
            "--subscribers",
            "1",
            "--count",
            "200",
            "--size",
            "64KiB",
        ],
        &["--count", "1000", "--size", "1KiB", "--rate", "20000"],
        // Compressed both ways: Publish requests in, Subscribe responses out.
        &[
            "--subscribers",
            "2",
            "--count",
            "3000",
            "--payload",
            "text",
            "--compression",
            "zstd",
            "--via",
            "publish",
        ],
        &[
            "--count",
            "3000",
            "--payload",
            "random",
            "--compression",
            "gzip",
        ],
    ];
    for run in runs {
        assert!(
            bench(&server, run).await,
            "bench {run:?} was not complete and in order"
        );
    }
    server.shutdown();
    server.wait().await;
}
