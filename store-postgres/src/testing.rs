//! A real, throwaway PostgreSQL for tests: one cluster per test binary, a fresh database per
//! test.
//!
//! The server binaries are found in `$CAPSYNC_PG_BIN`, on `PATH`, or in the newest
//! `/usr/lib/postgresql/*/bin` (Debian's `postgresql` package). `initdb` refuses to run as
//! root, so as root the cluster's directory is given to the `postgres` user and `initdb` and
//! `pg_ctl` run through `runuser -u postgres --`.
//!
//! The cluster lives in a fresh directory under the temp dir, listens on a free port of
//! 127.0.0.1 (and a Unix socket in that directory), with trust authentication for the user
//! `capsync_test` and `fsync=on`. It is stopped (`pg_ctl stop -m immediate`) and its directory
//! removed when the test binary exits normally (an `atexit` handler: statics are never
//! dropped). If the binary dies instead (a crash, SIGKILL), a watchdog started with the cluster
//! (a shell loop in its own process group, so a terminal's Ctrl-C does not reach it first)
//! sees its parent gone within half a second and does the same: no postgres is left behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

pub const USER: &str = "capsync_test";

pub struct Cluster {
    dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(1);

/// The binary's cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let cluster = Cluster::start();
        extern "C" fn stop_at_exit() {
            if let Some(cluster) = CLUSTER.get() {
                cluster.stop();
            }
        }
        // SAFETY: registers a plain `extern "C" fn` with no arguments, as atexit expects.
        unsafe { libc::atexit(stop_at_exit) };
        cluster
    })
}

/// A new, empty database of the cluster; returns its URL. Blocking (a small runtime of its
/// own), so sync tests and async ones alike can call it.
pub fn fresh_database() -> String {
    let cluster = cluster();
    let name = format!("t_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    let admin_url = cluster.url("postgres");
    let create = format!("CREATE DATABASE {name}");
    // On a thread of its own: the caller may already be inside a runtime.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(async {
            let (client, connection) =
                tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await.expect("connect to the test cluster");
            let driver = tokio::spawn(connection);
            client.batch_execute(&create).await.expect("CREATE DATABASE");
            drop(client);
            let _ = driver.await;
        })
    })
    .join()
    .expect("creating a test database");
    cluster.url(&name)
}

fn find_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("CAPSYNC_PG_BIN") {
        return PathBuf::from(dir);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| dir.join("pg_ctl").is_file() && dir.join("initdb").is_file());
    if let Some(dir) = on_path {
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("pg_ctl").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL's server binaries (initdb, pg_ctl) were not found on PATH or in \
             /usr/lib/postgresql/*/bin; install them (Debian: apt-get install postgresql) or set \
             CAPSYNC_PG_BIN to their directory"
        )
    })
}

/// uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .expect("running as root needs a `postgres` user to run the test cluster (initdb refuses root)")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().unwrap().port()
}

impl Cluster {
    fn start() -> Cluster {
        let bin = find_bin();
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        // Short: the socket path inside it must fit in sun_path (108 bytes).
        let dir = std::env::temp_dir().join(format!("capsync-pg-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir(&dir).expect("create the cluster directory");
        if as_postgres {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown the cluster directory to postgres");
        }
        let data = dir.join("data");
        let mut cluster = Cluster { dir, data, bin, port: 0, as_postgres };
        cluster.watchdog();
        let out = cluster
            .tool("initdb")
            .args(["-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync", "-D"])
            .arg(&cluster.data)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut last_error = String::new();
        for _ in 0..5 {
            cluster.port = free_port();
            let out = cluster.pg_ctl(&["-o", &cluster.options(), "start"]);
            if out.status.success() {
                return cluster;
            }
            last_error = format!(
                "{}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(cluster.dir.join("log")).unwrap_or_default()
            );
        }
        cluster.stop();
        panic!("the test PostgreSQL did not start: {last_error}");
    }

    /// The server options the cluster runs with (its port and socket directory).
    fn options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=400 -c shared_buffers=32MB",
            self.port,
            self.dir.display()
        )
    }

    /// Starts the cluster again after a `pg_ctl stop`, on the same port.
    pub fn start_again(&self) {
        let out = self.pg_ctl(&["-o", &self.options(), "start"]);
        assert!(out.status.success(), "pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// A command running one of the cluster's tools, as `postgres` when we are root.
    pub fn tool(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    fn stop_command(&self) -> String {
        let pg_ctl = self.bin.join("pg_ctl");
        let run = if self.as_postgres { "runuser -u postgres -- " } else { "" };
        format!("{run}'{}' stop -m immediate -D '{}'", pg_ctl.display(), self.data.display())
    }

    /// Stops the cluster (if it runs) and removes its directory.
    pub fn stop(&self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self.tool("pg_ctl").args(["stop", "-m", "immediate", "-D"]).arg(&self.data).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Starts a shell loop that outlives this process by at most half a second: once its parent
    /// is gone it stops the cluster and removes the directory. It also ends by itself once the
    /// directory is gone (a normal exit removed it).
    // Never waited for: it must outlive this process; init reaps it.
    #[allow(clippy::zombie_processes)]
    fn watchdog(&self) {
        use std::os::unix::process::CommandExt as _;
        let script = format!(
            "while kill -0 {pid} 2>/dev/null && [ -d '{dir}' ]; do sleep 0.5; done; \
             if [ -d '{dir}' ]; then {stop} >/dev/null 2>&1; rm -rf '{dir}'; fi",
            pid = std::process::id(),
            dir = self.dir.display(),
            stop = self.stop_command(),
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the cluster's watchdog");
    }

    /// `pg_ctl` on this cluster (e.g. `restart -m immediate`), as the cluster's owner. A server
    /// that `pg_ctl` starts writes to the cluster's log file, not to inherited pipes: a
    /// postmaster holding our stdout would keep `output()` waiting for ever.
    pub fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        self.tool("pg_ctl")
            .args(["-w", "-t", "60", "-l"])
            .arg(self.dir.join("log"))
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Runs `sql` (simple query protocol) on the database at `url` and returns each row's values
/// as text (`None` for NULL). Blocking, like [`fresh_database`].
pub fn query(url: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect to the test database");
            let driver = tokio::spawn(connection);
            let messages = client.simple_query(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            drop(client);
            let _ = driver.await;
            messages
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        Some((0..row.len()).map(|i| row.get(i).map(str::to_owned)).collect())
                    }
                    _ => None,
                })
                .collect()
        })
    })
    .join()
    .expect("querying a test database")
}
