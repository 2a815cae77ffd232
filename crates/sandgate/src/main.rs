//! The `sandgate` command: parses flags, loads the configuration, binds the listener and runs
//! the gateway until SIGINT or SIGTERM. Exit status 64 means a bad configuration.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use sandgate::config::{Config, LogFormat, ServeArgs};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "sandgate",
    version,
    about = "A secure gateway for sandboxes: create and manage \
    them, and reach any port inside them over HTTP, WebSocket and streams."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: control API on /sandboxes, proxy on /sandbox/{id}/, /{owner}/{name}/
    /// and {port}-{id}.{domain}, health on /health.
    Serve(Box<ServeArgs>),
    /// Copies standard input to the end of FILE, each line starting with the time it
    /// arrived (what the process backend runs for each sandbox's output).
    #[command(hide = true)]
    LogWriter { file: std::path::PathBuf },
}

/// The command line, each `serve` flag's help ending with the value it takes when neither
/// the file nor the environment sets it (the defaults `--check-config` prints).
fn command() -> clap::Command {
    let defaults: toml::Table = Config::load(&ServeArgs::default(), |_| None)
        .ok()
        .and_then(|c| c.to_toml().parse().ok())
        .unwrap_or_default();
    let show = |v: &toml::Value| match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) if f.fract() == 0.0 => format!("{f:.0}"),
        toml::Value::Array(items) if items.is_empty() => "none".into(),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    Cli::command().mut_subcommand("serve", |serve| {
        let ids: Vec<String> = serve
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        ids.into_iter()
            .fold(serve, |cmd, id| match defaults.get(&id) {
                Some(v) if !v.is_table() => {
                    let default = show(v);
                    cmd.mut_arg(&id, |a| {
                        let help = a.get_help().map(ToString::to_string).unwrap_or_default();
                        let long = a.get_long_help().map(ToString::to_string);
                        let a = a.help(format!("{help} [default: {default}]"));
                        match long {
                            Some(long) => a.long_help(format!("{long}\n\n[default: {default}]")),
                            None => a,
                        }
                    })
                }
                _ => cmd,
            })
    })
}

fn main() -> ExitCode {
    let parsed = command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        // `--help`, `--version`: clap prints them; exit 0.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // A bad flag or environment value is a bad configuration like any other: one line
        // naming the setting, status 64.
        Err(e) => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            eprintln!("sandgate: bad configuration: {line} (see sandgate serve --help)");
            return ExitCode::from(64);
        }
    };
    let args = match cli.command {
        Command::Serve(args) => *args,
        Command::LogWriter { file } => {
            return match sandgate::backend::process::run_log_writer(&file) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sandgate log-writer: {}: {e}", file.display());
                    ExitCode::FAILURE
                }
            };
        }
    };
    let config = match Config::load(&args, |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sandgate: bad configuration: {e}");
            return ExitCode::from(64);
        }
    };
    init_logging(config.log_format);
    if config.access_log {
        sandgate::access::init(config.log_format == LogFormat::Json);
    }
    // Certificate files are part of the configuration: checked here, before anything is bound,
    // so a bad one exits with the same status and `--check-config` reports it too.
    if let Some(files) = &config.tls {
        if let Err(e) = sandgate::tls::Tls::load(files) {
            eprintln!("sandgate: bad configuration: {e}");
            return ExitCode::from(64);
        }
    }
    if args.check_config {
        // TOML that `--config` reads back; comments name what `auto` resolved to here.
        println!("# sandgate serve: configuration ok");
        println!(
            "# isolation resolves to: {}",
            sandgate::resolved_isolation(&config)
        );
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    // The main event loop; `sandgate::run` starts one more per extra worker.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

/// Log lines to standard error, as `RUST_LOG` filters them (default `sandgate=info`): text
/// (colours only on a terminal) or one JSON object per line.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "sandgate=info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

async fn serve(config: Config) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind((config.host, config.port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "sandgate: cannot listen on {}:{}: {e}",
                config.host, config.port
            );
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        // Tests and scripts read this line to learn the port when started with --port 0.
        Ok(addr) => println!("listening on {addr}"),
        Err(e) => {
            eprintln!("sandgate: {e}");
            return ExitCode::FAILURE;
        }
    }
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {},
                    _ = term.recv() => {},
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutting down");
        signals.cancel();
    });
    // Orphans of commands are handed to the gateway, which reaps them (never its own
    // children: their exit codes are results).
    tokio::spawn(sandgate::backend::process::reaper::enable(shutdown.clone()));
    match sandgate::run(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandgate: {e}");
            ExitCode::FAILURE
        }
    }
}
