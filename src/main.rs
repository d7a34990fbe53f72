//! The `portico` command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use std::process::ExitCode;

const USAGE: &str = "\
portico — an API gateway

USAGE:
    portico run --config FILE [--workers N]   serve with FILE
    portico validate --config FILE            check FILE and exit (non-zero on errors)
    portico hash-key                          read an API key on stdin, print its SHA-256
                                              (for `consumers[].credentials.api_keys[].sha256`)
    portico hash-key --generate               make a new random key; print it and its SHA-256
    portico --version                         print the version

Logging: PORTICO_LOG=info|debug|warn (default info), to stderr.
Signals: SIGHUP reloads the config, SIGTERM/SIGINT drain and exit,
SIGUSR2 starts the binary at the same path and hands it the listeners.";

struct Args {
    command: String,
    config: Option<PathBuf>,
    workers: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let command = it.next().ok_or_else(|| USAGE.to_string())?;
    let mut args = Args {
        command,
        config: None,
        workers: None,
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" | "-c" => {
                args.config = Some(it.next().ok_or("--config needs a file")?.into())
            }
            "--workers" | "-w" => {
                let v = it.next().ok_or("--workers needs a number")?;
                let n: usize = v
                    .parse()
                    .map_err(|_| format!("--workers: `{v}` is not a number"))?;
                if n == 0 {
                    return Err("--workers must be at least 1".into());
                }
                args.workers = Some(n);
            }
            other => return Err(format!("unknown argument `{other}`\n\n{USAGE}")),
        }
    }
    Ok(args)
}

/// `portico hash-key`: the key is read from stdin (not an argument, so it
/// stays out of shell history and `ps`).
fn hash_key(generate: bool) -> ExitCode {
    use std::io::BufRead;
    let key = if generate {
        let mut raw = [0u8; 32];
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).is_err() {
            eprintln!("no system randomness available");
            return ExitCode::FAILURE;
        }
        let key: String = raw
            .iter()
            .map(|b| {
                const ALPHABET: &[u8; 64] =
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                ALPHABET[(b & 63) as usize] as char
            })
            .collect();
        println!("key:    {key}");
        key
    } else {
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line).is_err() {
            eprintln!("cannot read the key from stdin");
            return ExitCode::FAILURE;
        }
        let key = line.trim_end_matches(['\r', '\n']).to_string();
        if key.is_empty() {
            eprintln!("usage: echo -n KEY | portico hash-key   (or: portico hash-key --generate)");
            return ExitCode::from(2);
        }
        key
    };
    let hex = portico::auth::sha256_hex(key.as_bytes());
    if generate {
        println!("sha256: {hex}");
    } else {
        println!("{hex}");
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let mut raw = std::env::args().skip(1);
    if raw.next().as_deref() == Some("hash-key") {
        return match raw.next().as_deref() {
            None => hash_key(false),
            Some("--generate") => hash_key(true),
            Some(other) => {
                eprintln!("hash-key: unknown argument `{other}`\n\n{USAGE}");
                ExitCode::from(2)
            }
        };
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match args.command.as_str() {
        "--version" | "-V" | "version" => {
            println!("portico {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        "--help" | "-h" | "help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        "validate" => {
            let Some(path) = args.config else {
                eprintln!("validate needs --config FILE");
                return ExitCode::from(2);
            };
            match portico::load(&path) {
                Ok(s) => {
                    let routes: usize = s.config.routes.len();
                    println!(
                        "{}: OK ({} listeners, {} upstreams, {} routes)",
                        path.display(),
                        s.listeners.len(),
                        s.upstreams.len(),
                        routes
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        "run" => {
            let Some(path) = args.config else {
                eprintln!("run needs --config FILE");
                return ExitCode::from(2);
            };
            // First, before anything opens files: a parent's sockets (upgrade).
            let launch = portico::server::upgrade::Launch::from_process();
            init_logging();
            let snapshot = match portico::load(&path) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let workers = args
                .workers
                .or(snapshot.workers)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let rt = if workers == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .enable_all()
                    .build()
            };
            let rt = match rt {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!(workers, pid = std::process::id(), config = %path.display(), version = env!("CARGO_PKG_VERSION"), "starting portico");
            match rt.block_on(portico::server::serve_file(&path, snapshot, launch)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        other => {
            eprintln!("unknown command `{other}`\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTICO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
