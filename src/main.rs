//! The `batchd` binary: telemetry, then the CLI.

use clap::Parser;

fn main() -> std::process::ExitCode {
    batchd::memory::limit_arenas();
    let cli = batchd::cli::Cli::parse();
    let default_filter = match cli.command {
        batchd::cli::Command::Serve(_) | batchd::cli::Command::MockUpstream(_) => "batchd=info,tower_http=warn",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("BATCHD_LOG").unwrap_or_else(|_| default_filter.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(batchd::cli::main(cli)) {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
