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
//!
//! [`tls_cluster`] is a second cluster, started on first use, that serves TLS only: `ssl=on`
//! with a certificate for [`TLS_HOST`] and 127.0.0.1 signed by a test CA made with rcgen, and
//! a `pg_hba.conf` of `hostssl` lines (trust for [`USER`], SCRAM for [`SCRAM_USER`]), so a
//! connection in the clear over TCP is refused. Its Unix socket stays open (trust), for setup.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

pub const USER: &str = "capsync_test";

/// The host name the TLS cluster's certificate names (besides the IP address 127.0.0.1). It
/// resolves nowhere: give it as `host` with `hostaddr=127.0.0.1`.
pub const TLS_HOST: &str = "db.capsync.test";
/// A role of the TLS cluster that logs in with a password (SCRAM-SHA-256) only.
pub const SCRAM_USER: &str = "capsync_scram";
pub const SCRAM_PASSWORD: &str = "scram-test-password";

pub struct Cluster {
    dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
    tls: Option<TlsFiles>,
}

/// The TLS cluster's certificates (PEM files in the cluster's directory).
pub struct TlsFiles {
    /// The CA that signed the server's certificate.
    pub ca: PathBuf,
    /// A CA that signed nothing this cluster has.
    pub other_ca: PathBuf,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static TLS_CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(1);

/// The binary's cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let cluster = Cluster::start(false);
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

/// The binary's TLS-only cluster (see the module's docs), started on first use.
pub fn tls_cluster() -> &'static Cluster {
    TLS_CLUSTER.get_or_init(|| {
        let cluster = Cluster::start(true);
        extern "C" fn stop_at_exit() {
            if let Some(cluster) = TLS_CLUSTER.get() {
                cluster.stop();
            }
        }
        // SAFETY: as in `cluster`.
        unsafe { libc::atexit(stop_at_exit) };
        cluster
    })
}

/// A new, empty database of the cluster; returns its URL. Blocking (a small runtime of its
/// own), so sync tests and async ones alike can call it.
pub fn fresh_database() -> String {
    cluster().fresh_database()
}

/// Creates a new, empty database on `cluster` (through its Unix socket); returns its name.
fn create_database(cluster: &Cluster) -> String {
    let name = format!("t_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
    query(&cluster.socket_url("postgres"), &format!("CREATE DATABASE {name}"));
    name
}

/// Makes the test CA, the server's certificate and key, and a CA that signed nothing, in `dir`.
fn write_tls_files(dir: &Path, owner: Option<(u32, u32)>) -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    use std::os::unix::fs::OpenOptionsExt as _;
    let ca = |name: &str| {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a CA key")).expect("a CA certificate")
    };
    let (issuer, other) = (ca("capsync test CA"), ca("capsync other CA"));
    let key = KeyPair::generate().expect("a server key");
    let mut params = CertificateParams::new(vec![TLS_HOST.to_owned(), "127.0.0.1".to_owned()]).expect("server names");
    params.distinguished_name.push(DnType::CommonName, TLS_HOST);
    let cert = params.signed_by(&key, &issuer).expect("the server certificate");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        std::io::Write::write_all(&mut file, text.as_bytes()).expect("write a TLS file");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown a TLS file to postgres");
        }
        path
    };
    write("server.crt", cert.pem());
    write("server.key", key.serialize_pem());
    TlsFiles { ca: write("ca.pem", issuer.pem()), other_ca: write("other-ca.pem", other.pem()) }
}

impl Cluster {
    /// A new, empty database of this cluster; returns its URL (TCP, 127.0.0.1).
    pub fn fresh_database(&self) -> String {
        self.url(&create_database(self))
    }

    /// The TLS cluster's certificates; `None` for the plain cluster.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// A `key=value` connection string for `db` through the cluster's Unix socket (never TLS).
    pub fn socket_url(&self, db: &str) -> String {
        format!("host='{}' port={} user={USER} dbname={db}", self.dir.display(), self.port)
    }
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
    fn start(tls: bool) -> Cluster {
        let bin = find_bin();
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        // Short: the socket path inside it must fit in sun_path (108 bytes).
        let dir = std::env::temp_dir().join(format!("capsync-pg-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir(&dir).expect("create the cluster directory");
        let owner = as_postgres.then(postgres_ids);
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown the cluster directory to postgres");
        }
        let data = dir.join("data");
        let mut cluster = Cluster { dir, data, bin, port: 0, as_postgres, tls: None };
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
        if tls {
            cluster.tls = Some(write_tls_files(&cluster.dir, owner));
            // Over TCP, TLS only; the Unix socket stays open for setup. Rewriting the file
            // keeps its owner.
            let hba = format!(
                "local all all trust\n\
                 hostssl all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n\
                 hostssl all all 127.0.0.1/32 trust\n"
            );
            std::fs::write(cluster.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        }
        let mut last_error = String::new();
        for _ in 0..5 {
            cluster.port = free_port();
            let out = cluster.pg_ctl(&["-o", &cluster.options(), "start"]);
            if out.status.success() {
                if tls {
                    query(
                        &cluster.socket_url("postgres"),
                        &format!("CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}'"),
                    );
                }
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
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=400 -c shared_buffers=32MB",
            self.port,
            self.dir.display()
        );
        if self.tls.is_some() {
            options += &format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                self.dir.join("server.crt").display(),
                self.dir.join("server.key").display()
            );
        }
        options
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
