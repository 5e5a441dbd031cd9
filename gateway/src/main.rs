//! The `chorus` binary: `chorus serve` starts a complete server with embedded defaults.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CHORUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = chorus_gateway::config::Cli::parse();
    let config = match cli.command {
        chorus_gateway::config::Command::PreviewWorker(args) => {
            return chorus_gateway::files::preview::run_worker(&args);
        }
        chorus_gateway::config::Command::Serve(args) => match args.resolve() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("chorus: {e}");
                return std::process::ExitCode::from(2);
            }
        },
    };
    match chorus_gateway::serve(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chorus: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
