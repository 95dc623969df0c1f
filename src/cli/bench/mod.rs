//! `capsync bench`: every scenario against its baseline in one run, alternating for several
//! rounds and reporting medians, on fresh temporary data dirs (and, on PostgreSQL, a fresh
//! database per scenario); a table of figures and ratios, or one JSON object with every figure.

mod harness;
mod pg;
mod s9;
mod scenarios;

use clap::Args;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Print one JSON object with every figure instead of a table.
    #[arg(long)]
    json: bool,
    /// Smaller runs and one round, for a quick look.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (comma-separated, e.g. `s1,s6`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Skip the Redis baselines (they install redis-server from Debian's packages if missing).
    #[arg(long)]
    no_redis: bool,
    /// Run every scenario's server(s) on PostgreSQL: each gets a fresh database, created
    /// through this URL (postgres://USER[:PASSWORD]@HOST:PORT/DATABASE; the role needs
    /// CREATEDB) and dropped at the end. Adds the raw tokio-postgres baselines, S9 and S10.
    #[arg(long, value_name = "URL", value_parser = parse_store_url, conflicts_with = "pg_cluster")]
    store: Option<StoreUrl>,
    /// As --store, on a throwaway PostgreSQL cluster the bench starts for the run (initdb in a
    /// temp dir as the `postgres` user when root, a free port, trust auth, fsync on) and
    /// removes at exit. Needs PostgreSQL's server binaries (initdb, pg_ctl; CAPSYNC_PG_BIN).
    #[arg(long)]
    pg_cluster: bool,
}

/// A PostgreSQL URL; its `Debug` hides it (it may hold a password).
#[derive(Clone)]
struct StoreUrl(String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreUrl(<redacted>)")
    }
}

/// Accepts `postgres://` and `postgresql://` URLs, never echoing the value (it may hold a
/// password).
fn parse_store_url(text: &str) -> Result<StoreUrl, String> {
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        Ok(StoreUrl(text.to_owned()))
    } else {
        Err("--store takes a postgres:// or postgresql:// URL".into())
    }
}

/// What the scenarios share.
pub struct Ctx {
    pub dir: PathBuf,
    pub quick: bool,
    pub rounds: usize,
    no_redis: bool,
    /// Why the Redis baseline is unavailable, once it failed.
    redis_error: std::cell::RefCell<Option<String>>,
    /// Where the servers' databases come from; `None`: SQLite in each data dir.
    pg: Option<pg::PgTarget>,
}

impl Ctx {
    /// A fresh store for scenario part `name`: `None` (SQLite in the data dir) or the URL of a
    /// new PostgreSQL database.
    pub async fn store(&self, name: &str) -> anyhow::Result<Option<String>> {
        match &self.pg {
            None => Ok(None),
            Some(target) => Ok(Some(target.fresh_database().await.map_err(|e| e.context(format!("a database for {name}")))?)),
        }
    }

    /// A server for scenario part `name`: data dir `<dir>/<name>`, on a fresh store.
    pub async fn server(&self, name: &str) -> anyhow::Result<harness::BenchServer> {
        let store = self.store(name).await?;
        harness::BenchServer::start(&self.dir.join(name), store.as_deref())
    }

    /// A Redis run, or `None` when Redis is skipped or unavailable (the reason is kept).
    pub fn redis(&self, clients: u32, pipeline: u32, requests: u64) -> Option<(f64, f64, f64)> {
        if self.no_redis || self.redis_error.borrow().is_some() {
            return None;
        }
        match harness::redis_xadd(clients, pipeline, requests) {
            Ok(figures) => Some(figures),
            Err(err) => {
                eprintln!("capsync bench: the Redis baseline is unavailable: {err:#}");
                *self.redis_error.borrow_mut() = Some(format!("{err:#}"));
                None
            }
        }
    }

    pub fn median_of(&self, values: Vec<Option<f64>>) -> Option<f64> {
        let values: Vec<f64> = values.into_iter().flatten().collect();
        (!values.is_empty()).then(|| harness::median(values))
    }
}

/// One line of the table.
pub struct Row {
    pub scenario: String,
    pub measured: String,
    pub baseline: String,
    pub ratio: Option<f64>,
    pub target: &'static str,
    pub met: Option<bool>,
}

impl Row {
    /// `ours` against `theirs` (same unit); met when ours/theirs >= `at_least` (0 = judge later).
    pub fn ratio(scenario: &str, ours: f64, theirs: Option<f64>, unit: &str, target: &'static str, at_least: f64) -> Row {
        let ratio = theirs.filter(|t| *t > 0.0).map(|t| ours / t);
        Row {
            scenario: scenario.to_owned(),
            measured: format!("{ours:.1} {unit}"),
            baseline: theirs.map(|t| format!("{t:.1} {unit}")).unwrap_or_else(|| "-".into()),
            ratio,
            target,
            met: ratio.filter(|_| at_least > 0.0).map(|r| r >= at_least),
        }
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let pg = match (args.store, args.pg_cluster) {
        (Some(url), _) => Some(pg::PgTarget::Url { url: url.0, made: Default::default() }),
        (None, true) => Some(pg::PgTarget::Cluster),
        (None, false) => None,
    };
    let ctx = Ctx {
        dir: dir.path().to_owned(),
        quick: args.quick,
        rounds: if args.quick { 1 } else { 3 },
        no_redis: args.no_redis,
        redis_error: Default::default(),
        pg,
    };
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(name));
    if ctx.pg.is_none() && args.only.iter().any(|o| o.eq_ignore_ascii_case("s9") || o.eq_ignore_ascii_case("s10")) {
        anyhow::bail!("S9 and S10 run several nodes on one PostgreSQL: pass --pg-cluster or --store postgres://...");
    }
    let result = run_scenarios(&ctx, args.json, wanted).await;
    if let Some(target) = &ctx.pg {
        target.cleanup().await;
    }
    result
}

async fn run_scenarios(ctx: &Ctx, json: bool, wanted: impl Fn(&str) -> bool) -> anyhow::Result<ExitCode> {
    let mut store_line = String::from("SQLite in each server's data dir");
    if let Some(target) = &ctx.pg {
        store_line = target.open().await?;
    }
    eprintln!("capsync bench: store: {store_line}");
    let mut figures = Map::new();
    let mut rows = Vec::new();
    let mut empty_rate = None;
    if wanted("s1") || wanted("s4") {
        let (value, mut r, ours) = scenarios::s1(ctx).await?;
        empty_rate = Some(ours);
        figures.insert("s1".into(), value);
        if wanted("s1") {
            rows.append(&mut r);
        }
    }
    macro_rules! scenario {
        ($name:literal, $call:expr) => {
            if wanted($name) {
                let (value, mut r) = $call.await?;
                figures.insert($name.into(), value);
                rows.append(&mut r);
            }
        };
    }
    scenario!("s2", scenarios::s2(ctx));
    scenario!("s3", scenarios::s3(ctx));
    if let Some(empty) = empty_rate.filter(|_| wanted("s4")) {
        scenario!("s4", scenarios::s4(ctx, empty));
    }
    scenario!("s5", scenarios::s5(ctx));
    scenario!("s6", scenarios::s6(ctx));
    scenario!("s7", scenarios::s7(ctx));
    scenario!("s7w", scenarios::s7w(ctx));
    scenario!("s8", scenarios::s8(ctx));
    if ctx.pg.is_some() {
        scenario!("s9", s9::s9(ctx));
        scenario!("s10", scenarios::s10(ctx));
    }
    figures.insert("store".into(), Value::String(store_line.clone()));
    if let Some(reason) = ctx.redis_error.borrow().as_ref() {
        figures.insert("redis_unavailable".into(), Value::String(reason.clone()));
    }
    if json {
        let table: Vec<Value> = rows
            .iter()
            .map(|r| serde_json::json!({"scenario": r.scenario, "measured": r.measured, "baseline": r.baseline, "ratio": r.ratio, "target": r.target, "met": r.met}))
            .collect();
        figures.insert("table".into(), Value::Array(table));
        println!("{}", Value::Object(figures));
    } else {
        println!("store: {store_line}");
        println!("{:<42}  {:>26}  {:>18}  {:>7}  {:<12}  MET", "SCENARIO", "CAPSYNC", "BASELINE", "RATIO", "TARGET");
        for r in &rows {
            let ratio = r.ratio.map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into());
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            };
            println!("{:<42}  {:>26}  {:>18}  {:>7}  {:<12}  {met}", r.scenario, r.measured, r.baseline, ratio, r.target);
        }
    }
    Ok(ExitCode::SUCCESS)
}
