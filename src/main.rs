//! The `flowgate` command: parses the command line, sets up logging and the
//! runtime, and hands over to the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use flowgate::config::{self, Config, LogFormat};
use flowgate::demo::DemoEngine;
use flowgate::supervisor::Proxy;
use flowgate::workers::Workers;
use tracing_subscriber::EnvFilter;

/// mimalloc: less CPU per request than the system allocator in benches/load.sh,
/// and it hands freed pages back to the system (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "flowgate",
    version,
    about = "Load-balancing reverse proxy for workflow-engine pools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy in the foreground, logging to stderr.
    Run {
        /// The configuration file.
        #[arg(long, env = "FLOWGATE_CONFIG")]
        config: PathBuf,
    },
    /// Parse and validate a configuration file; binds nothing.
    Check {
        /// The configuration file.
        #[arg(long, env = "FLOWGATE_CONFIG")]
        config: PathBuf,
    },
    /// Read an admin token on stdin and print its SHA-256 for `[[admin.tokens]]`.
    HashToken,
    /// Start three demo engine backends on loopback and flowgate in front of them.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Some(_) => {
                println!("{}: configuration is valid", config.display());
                ExitCode::SUCCESS
            }
            None => ExitCode::from(1),
        },
        Command::Run { config: path } => {
            let Some(config) = load(&path) else {
                return ExitCode::from(1);
            };
            init_logging(config.global.log_format);
            let Some((runtime, workers)) = build_runtime(config.global.threads) else {
                return ExitCode::from(1);
            };
            let handles = workers.handles().to_vec();
            let code = runtime.block_on(flowgate::supervisor::run(config, handles));
            // Stops the worker threads before the main runtime goes.
            drop(workers);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::HashToken => hash_token(),
        Command::Demo { listen } => {
            init_logging(LogFormat::Text);
            let Some((runtime, _workers)) = build_runtime(1) else {
                return ExitCode::from(1);
            };
            match runtime.block_on(demo(listen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("flowgate demo: {err}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Prints the hex SHA-256 of the token on stdin (one trailing newline is not
/// part of the token), for `sha256 = "..."` in `[[admin.tokens]]`.
fn hash_token() -> ExitCode {
    use std::io::Read;
    let mut token = Vec::new();
    if let Err(err) = std::io::stdin().read_to_end(&mut token) {
        eprintln!("flowgate hash-token: cannot read stdin: {err}");
        return ExitCode::from(1);
    }
    if token.ends_with(b"\n") {
        token.pop();
        if token.ends_with(b"\r") {
            token.pop();
        }
    }
    if token.is_empty() {
        eprintln!(
            "flowgate hash-token: no token on stdin (pipe it in, e.g. printf %s \"$TOKEN\" | flowgate hash-token)"
        );
        return ExitCode::from(1);
    }
    let digest = flowgate::admin::auth::token_digest(&token);
    println!("{}", flowgate::admin::auth::hex(&digest));
    ExitCode::SUCCESS
}

/// Loads and validates a config, printing every problem on stderr.
fn load(path: &Path) -> Option<Config> {
    match config::load(path) {
        Ok(config) => Some(config),
        Err(errors) => {
            eprintln!("{errors}");
            None
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("FLOWGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The runtime flowgate starts on and, for `threads` (0: one per core) above
/// one, the worker threads that serve beside it. Each thread runs tokio's
/// current-thread scheduler and serves the connections it accepted (see
/// `flowgate::workers`): no run queues shared between threads and no
/// cross-thread wake-ups on the request path (measured in docs/performance.md).
fn build_runtime(threads: usize) -> Option<(tokio::runtime::Runtime, Workers)> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let built = flowgate::workers::serving_runtime()
        .and_then(|runtime| Ok((runtime, Workers::start(threads - 1)?)));
    match built {
        Ok(built) => Some(built),
        Err(err) => {
            eprintln!("flowgate: cannot start the runtime: {err}");
            None
        }
    }
}

/// Three demo engines on loopback and a proxy in front of them, until Ctrl-C.
async fn demo(listen: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let mut engines = Vec::new();
    for index in 1..=3 {
        let engine = DemoEngine::bind(&format!("engine-{index}"), "127.0.0.1:0".parse()?).await?;
        engines.push(engine.spawn());
    }
    let servers: String = engines
        .iter()
        .map(|engine| {
            format!(
                "[[backends.engines.servers]]\nname = \"{}\"\naddress = \"{}\"\n\n",
                engine.name(),
                engine.local_addr()
            )
        })
        .collect();
    let text = format!(
        "[global]\ngrace_period = \"5s\"\n\n\
         [frontends.demo]\nbind = [\"{listen}\"]\nbackend = \"engines\"\n\n\
         [backends.engines]\nbalance = \"round_robin\"\n\n\
         [backends.engines.health]\ncheck = \"http\"\npath = \"/health\"\ninterval = \"1s\"\n\n{servers}"
    );
    let config = config::parse(&text, Path::new("demo.toml"))?;
    let proxy = match Proxy::start(config.clone()).await {
        Ok(proxy) => proxy,
        Err(err) if listen.port() != 0 => {
            // The demo should run anywhere: take any free port instead.
            eprintln!("flowgate demo: {err}; using a free port instead");
            let mut config = config;
            config.frontends[0].bind = vec![SocketAddr::new(listen.ip(), 0)];
            Proxy::start(config).await?
        }
        Err(err) => return Err(err.into()),
    };
    let addr = proxy
        .local_addr("demo")
        .ok_or("the demo frontend did not bind")?;
    println!();
    println!("flowgate demo: proxy on http://{addr}, engines:");
    for engine in &engines {
        println!("  {} on http://{}", engine.name(), engine.local_addr());
    }
    println!();
    println!("Try (each call is answered by the next engine in turn):");
    println!("  curl -s http://{addr}/api/v1/workflows/order-42");
    println!("  curl -s -X POST --data-binary 'hello' http://{addr}/api/v1/workflows");
    println!("  curl -s 'http://{addr}/api/v1/tasks/poll?wait=2s'");
    println!("  curl -s http://{addr}/health");
    println!();
    println!("Ctrl-C stops everything.");
    tokio::signal::ctrl_c().await?;
    proxy.shutdown(Duration::from_secs(5)).await;
    for engine in engines {
        engine.shutdown().await;
    }
    Ok(())
}
