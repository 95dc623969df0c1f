//! Command-line definitions and dispatch.

mod admin;
mod agents;
mod bench;
mod client;
mod ops;
mod render;
mod serve;
mod share;

use capsync_schema::SturdyUri;
use clap::{Args, Parser, Subcommand};
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "capsync", version, about = "Durable session sync over Cap'n Proto capabilities")]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `capsync_server=debug`);
    /// RUST_LOG overrides it. Logs go to stderr and never contain tokens.
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    /// `text` (human-readable, the default) or `json`: one JSON object per event, for a log
    /// system (tracing's JSON format: `timestamp`, `level`, `target`, `fields`, `spans`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CAPSYNC_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sync server.
    Serve(serve::ServeArgs),
    /// Administer a server: sessions, shares, spaces, revocation, audit, stats.
    Admin(admin::AdminArgs),
    /// Mint a share of a session (or of a share) and print its sturdy URI.
    Share(share::ShareArgs),
    /// Queue a put of one entity and deliver it.
    Put(client::PutArgs),
    /// Queue a delete of one entity and deliver it.
    Delete(client::DeleteArgs),
    /// Queue every op of a JSON Lines file, then deliver them (with a progress bar).
    Push(client::PushArgs),
    /// Deliver everything queued in the outbox; --follow keeps going.
    Sync(client::SyncArgs),
    /// Pull a session into the local replica.
    Pull(client::PullArgs),
    /// Show each attached ref: state, op counts, cursor.
    Status(client::StatusArgs),
    /// Follow a session live: print each op as it is applied (into the local replica too).
    Tail(client::TailArgs),
    /// Import an agent's sessions (codex, opencode) through a space: one capsync session each,
    /// attached as codex:<id> / opencode:<id>; a re-run sends only what is new.
    Import(agents::ImportArgs),
    /// Import continuously: new sessions and new lines as the agent writes them.
    Watch(agents::WatchArgs),
    /// Write a session back in an agent's own format (a Codex rollout, opencode's JSON tree).
    Export(agents::ExportArgs),
    /// Measure capsync on this machine: scenarios and figures side by side.
    Bench(bench::BenchArgs),
    /// Write a consistent copy of a data dir's database while its server runs.
    Backup(ops::BackupArgs),
    /// Make a new data dir from a backup (refuses a dir in use or not empty).
    Restore(ops::RestoreArgs),
}

/// How client commands verify a `capsyncs://` server.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArg {
    /// CA certificates (PEM) to verify capsyncs:// servers against, instead of the system roots.
    #[arg(long, env = "CAPSYNC_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
}

/// Where the admin client finds the admin sturdy URI.
#[derive(Args, Debug, Clone)]
pub struct AdminRef {
    /// The admin sturdy URI (capsync://HOST:PORT/TOKEN). Prefer --admin-file: a URI on the
    /// command line is visible to other local users.
    #[arg(long, env = "CAPSYNC_ADMIN", hide_env_values = true, value_parser = UriParser)]
    admin: Option<SturdyUri>,
    /// File holding the admin sturdy URI.
    #[arg(long, value_name = "PATH", default_value = "./capsync-data/admin.uri")]
    admin_file: PathBuf,
    #[command(flatten)]
    tls: TlsArg,
}

/// Parses a sturdy URI argument at the command line, so the token is held only by the
/// redacting [`SturdyUri`] from then on (an argument struct's `Debug` never shows it). clap's
/// own "invalid value" error echoes the value, token and all, so this error names only the
/// problem.
#[derive(Clone, Copy, Debug)]
pub struct UriParser;

impl clap::builder::TypedValueParser for UriParser {
    type Value = SturdyUri;

    fn parse_ref(&self, _: &clap::Command, arg: Option<&clap::Arg>, value: &std::ffi::OsStr) -> Result<SturdyUri, clap::Error> {
        use clap::error::ErrorKind;
        let what = arg.map_or_else(|| "URI".to_owned(), |a| a.get_id().as_str().to_uppercase());
        let text = value.to_str().ok_or_else(|| clap::Error::raw(ErrorKind::InvalidUtf8, format!("the {what} argument is not UTF-8\n")))?;
        SturdyUri::parse(text).map_err(|err| clap::Error::raw(ErrorKind::ValueValidation, format!("the {what} argument: {err}\n")))
    }
}

/// What a client command works on: a sturdy URI, or the name of a ref attached in the outbox
/// (`codex:<id>` and `opencode:<id>` from `capsync import`, `ref-…` for a URI used before).
/// `Debug` redacts a URI's token.
#[derive(Clone, Debug)]
pub enum Target {
    Uri(SturdyUri),
    Ref(String),
}

/// Parses a [`Target`]: anything with a `://` is a sturdy URI (parsed as [`UriParser`] does,
/// never echoed), anything else a ref name.
#[derive(Clone, Copy, Debug)]
pub struct TargetParser;

impl clap::builder::TypedValueParser for TargetParser {
    type Value = Target;

    fn parse_ref(&self, cmd: &clap::Command, arg: Option<&clap::Arg>, value: &std::ffi::OsStr) -> Result<Target, clap::Error> {
        use clap::error::ErrorKind;
        let text = value.to_str().ok_or_else(|| clap::Error::raw(ErrorKind::InvalidUtf8, "the argument is not UTF-8\n"))?;
        if text.contains("://") {
            return UriParser.parse_ref(cmd, arg, value).map(Target::Uri);
        }
        if text.is_empty() || text.len() > 256 || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(clap::Error::raw(
                ErrorKind::ValueValidation,
                "give a sturdy URI (capsync://HOST:PORT/TOKEN) or the name of an attached ref (see `capsync status`)\n",
            ));
        }
        Ok(Target::Ref(text.to_owned()))
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Serve(_) => "info",
        // Import and watch report skipped files themselves (relative paths, once each).
        Command::Import(_) | Command::Watch(_) => "warn,capsync_agents=error",
        _ => "warn",
    };
    let filter = std::env::var("RUST_LOG").ok().or_else(|| cli.log.clone()).unwrap_or_else(|| default.to_owned());
    let mut filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // mio logs every poller registration at trace level once its `log` feature is on (the
    // `notify` crate of `capsync watch` turns it on for the whole binary): silenced unless the
    // filter names mio itself.
    if !std::env::var("RUST_LOG").ok().or_else(|| cli.log.clone()).is_some_and(|f| f.contains("mio")) {
        if let Ok(directive) = "mio=off".parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match cli.log_format {
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).try_init(),
    };
}

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Admin(args) => local(admin::run(args)),
        Command::Share(args) => local(share::run(args)),
        Command::Put(args) => local(client::put(args)),
        Command::Delete(args) => local(client::delete(args)),
        Command::Push(args) => local(client::push(args)),
        Command::Sync(args) => local(client::sync(args)),
        Command::Pull(args) => local(client::pull(args)),
        Command::Status(args) => client::status(args),
        Command::Tail(args) => local(client::tail(args)),
        Command::Import(args) => local(agents::import(args)),
        Command::Watch(args) => local(agents::watch(args)),
        Command::Export(args) => local(agents::export(args)),
        Command::Bench(args) => local(bench::run(args)),
        Command::Backup(args) => ops::backup(args),
        Command::Restore(args) => ops::restore(args),
    }
}

/// Runs a client future on a single-threaded runtime inside a `LocalSet` (capnp-rpc is `!Send`).
fn local<F: Future<Output = anyhow::Result<ExitCode>>>(future: F) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    tokio::task::LocalSet::new().block_on(&runtime, future)
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Parses durations like `90`, `45s`, `30m`, `1h`, `7d` into seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 90s, 30m, 1h or 7d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("`{text}` is too long"))
}

/// Unix ms as RFC 3339-ish UTC text for humans; `never` for 0.
pub fn format_ms(ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dates() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(format_ms(0), "never");
        assert_eq!(format_ms(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn parsed_arguments_never_show_a_token() {
        let token = capsync_schema::Token::generate();
        let uri = SturdyUri::new("127.0.0.1:7420", token.clone()).expose();
        let secret = &token.expose()[4..];
        let commands: [&[&str]; 8] = [
            &["capsync", "put", &uri, "--kind", "message", "--id", "m", "--data", "1"],
            &["capsync", "delete", &uri, "--kind", "message", "--id", "m"],
            &["capsync", "push", &uri, "--file", "ops.jsonl"],
            &["capsync", "pull", &uri, "--json"],
            &["capsync", "tail", &uri],
            &["capsync", "share", &uri, "--rights", "read"],
            &["capsync", "admin", "--admin", &uri, "list-sessions"],
            &["capsync", "admin", "--admin", &uri, "stats"],
        ];
        for argv in commands {
            let cli = Cli::try_parse_from(argv).unwrap();
            let shown = format!("{cli:?}");
            assert!(shown.contains("127.0.0.1:7420"), "the URI is parsed: {shown}");
            assert!(!shown.contains(&secret[..12]), "`{}` shows its token in Debug", argv[1]);
        }
        let malformed = format!("{uri}x");
        let err = Cli::try_parse_from(["capsync", "pull", &malformed]).unwrap_err().to_string();
        assert!(err.contains("token is malformed"), "{err}");
        assert!(!err.contains(&secret[..12]), "a refused URI is not echoed");
    }
}
