//! The `batchd` binary: telemetry, then the CLI.

use clap::Parser;

fn main() -> std::process::ExitCode {
    batchd::memory::limit_arenas();
    let cli = batchd::cli::Cli::parse();
    let default_filter = match cli.command {
        batchd::cli::Command::Serve(_) | batchd::cli::Command::MockUpstream(_) => "batchd=info,tower_http=warn",
        _ => "warn",
    };
    let filter = match log_filter(default_filter) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(batchd::cli::main(cli)) {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The log filter: `BATCHD_LOG` when set (a filter that does not parse is refused, not
/// ignored), else `default`.
fn log_filter(default: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    match std::env::var("BATCHD_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&v).map_err(|e| format!("BATCHD_LOG={v:?} is not a log filter ({e}); try BATCHD_LOG=batchd=debug"))
        }
        _ => Ok(default.into()),
    }
}
