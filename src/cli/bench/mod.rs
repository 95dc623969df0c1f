//! `capsync bench`: every scenario against its baseline in one run, alternating for several
//! rounds and reporting medians, on fresh temporary data dirs; a table of figures and ratios,
//! or one JSON object with every figure.

mod harness;
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
}

/// What the scenarios share.
pub struct Ctx {
    pub dir: PathBuf,
    pub quick: bool,
    pub rounds: usize,
    no_redis: bool,
    /// Why the Redis baseline is unavailable, once it failed.
    redis_error: std::cell::RefCell<Option<String>>,
}

impl Ctx {
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
    let ctx = Ctx {
        dir: dir.path().to_owned(),
        quick: args.quick,
        rounds: if args.quick { 1 } else { 3 },
        no_redis: args.no_redis,
        redis_error: Default::default(),
    };
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(name));
    let mut figures = Map::new();
    let mut rows = Vec::new();
    let mut empty_rate = None;
    if wanted("s1") || wanted("s4") {
        let (value, mut r, ours) = scenarios::s1(&ctx).await?;
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
    scenario!("s2", scenarios::s2(&ctx));
    scenario!("s3", scenarios::s3(&ctx));
    if let Some(empty) = empty_rate.filter(|_| wanted("s4")) {
        scenario!("s4", scenarios::s4(&ctx, empty));
    }
    scenario!("s5", scenarios::s5(&ctx));
    scenario!("s6", scenarios::s6(&ctx));
    scenario!("s7", scenarios::s7(&ctx));
    scenario!("s7w", scenarios::s7w(&ctx));
    scenario!("s8", scenarios::s8(&ctx));
    if let Some(reason) = ctx.redis_error.borrow().as_ref() {
        figures.insert("redis_unavailable".into(), Value::String(reason.clone()));
    }
    if args.json {
        let table: Vec<Value> = rows
            .iter()
            .map(|r| serde_json::json!({"scenario": r.scenario, "measured": r.measured, "baseline": r.baseline, "ratio": r.ratio, "target": r.target, "met": r.met}))
            .collect();
        figures.insert("table".into(), Value::Array(table));
        println!("{}", Value::Object(figures));
    } else {
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
