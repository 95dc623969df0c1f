//! TLS to PostgreSQL with libpq's `sslmode` and `sslrootcert`, over tokio-rustls.
//!
//! tokio-postgres knows only `sslmode=disable|prefer|require` and rejects the other libpq TLS
//! parameters, so [`parse`] takes `sslmode` and `sslrootcert` out of the connection string
//! (a `postgres://` URL or a `key=value` string) before tokio-postgres parses the rest, and
//! returns a [`PgConnector`] that the pool and the LISTEN connection both connect with.
//!
//! What each mode does, as libpq documents it
//! (<https://www.postgresql.org/docs/current/libpq-ssl.html>):
//!
//! | `sslmode`          | encrypted                      | certificate checked                          |
//! |--------------------|--------------------------------|----------------------------------------------|
//! | `disable`          | no                             | -                                            |
//! | `allow`            | only if the server insists     | chain, if a root certificate is known        |
//! | `prefer` (default) | if the server can              | chain, if a root certificate is known        |
//! | `require`          | yes                            | chain, if a root certificate is known        |
//! | `verify-ca`        | yes                            | chain (a root certificate is needed)         |
//! | `verify-full`      | yes                            | chain and host name (a root certificate is needed) |
//!
//! "A root certificate is known" means `sslrootcert` names a PEM file, or, as in libpq,
//! `~/.postgresql/root.crt` exists. `sslrootcert=system` trusts the system's roots
//! (rustls-native-certs; `SSL_CERT_FILE`/`SSL_CERT_DIR` are honoured) and, as in libpq 16,
//! makes `verify-full` the default and the only mode allowed with it. Where nothing is
//! checked, the handshake's signatures still are: the connection is encrypted to whoever holds
//! the key of the certificate the server sent, which need not be the database.
//!
//! Like libpq: `allow` connects without TLS first and retries with TLS if the server refuses;
//! `prefer` retries without TLS if the TLS handshake fails or the server refuses the encrypted
//! connection; the host name `verify-full` checks is `host` (not `hostaddr`), against the
//! certificate's DNS and IP subject alternative names, or its common name when it has none;
//! TLS is never tried over a Unix socket. Unlike libpq: an `sslrootcert` file that does not
//! exist is an error in every mode (libpq silently stops verifying under `require`); and no
//! `PG*` environment variable is read (tokio-postgres reads none either).
//!
//! The connection offers `tls-server-end-point` channel binding, so SCRAM authentication
//! binds itself to the TLS session when the server offers it (`channel_binding=prefer`,
//! tokio-postgres's default and libpq's).

use crate::PgError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Connection, Socket};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// The roots a server certificate's chain is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Roots {
    /// A PEM file of CA certificates (`sslrootcert=PATH`, or libpq's `~/.postgresql/root.crt`).
    File(PathBuf),
    /// The system's roots (`sslrootcert=system`).
    System,
}

/// What a connection string asks of TLS: the mode and the roots, if any. No roots: the
/// certificate is not checked (only possible below `verify-ca`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: SslMode,
    pub roots: Option<Roots>,
}

/// Parses a libpq-style connection string (`postgres://...` or `key=value ...`): the
/// tokio-postgres configuration of everything but `sslmode` and `sslrootcert`, and the
/// connector those ask for. Errors never quote the string (it may hold a password).
pub fn parse(url: &str) -> Result<(tokio_postgres::Config, PgConnector), PgError> {
    let invalid = |why: String| PgError::Other(format!("invalid PostgreSQL URL: {why}"));
    let split = split(url).map_err(invalid)?;
    let config: tokio_postgres::Config = split.rest.parse().map_err(|e| invalid(format!("{e}")))?;
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
    let params = resolve(split.sslmode.as_deref(), split.sslrootcert.as_deref(), home.as_deref()).map_err(invalid)?;
    // libpq never tries TLS over a Unix socket, whatever the mode.
    let unix_only = config.get_hostaddrs().is_empty()
        && !config.get_hosts().is_empty()
        && config.get_hosts().iter().all(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)));
    let mode = if unix_only { SslMode::Disable } else { params.mode };
    let client_config = match mode {
        SslMode::Disable => None,
        _ => Some(client_config(&params).map_err(|e| PgError::Other(format!("PostgreSQL TLS: {e}")))?),
    };
    let connector = PgConnector {
        mode,
        tls: MakeRustls { config: client_config, attempt: Arc::default(), context: Arc::from(describe(&params)) },
    };
    Ok((config, connector))
}

/// "sslmode=verify-full, sslrootcert=/etc/ca.pem", for error messages.
fn describe(params: &TlsParams) -> String {
    match &params.roots {
        Some(Roots::File(path)) => format!("sslmode={}, sslrootcert={}", params.mode.name(), path.display()),
        Some(Roots::System) => format!("sslmode={}, sslrootcert=system", params.mode.name()),
        None => format!("sslmode={}", params.mode.name()),
    }
}

/// libpq's rules for `sslmode` and `sslrootcert` (given or not); `home` is where
/// `.postgresql/root.crt` is looked for.
pub fn resolve(sslmode: Option<&str>, sslrootcert: Option<&str>, home: Option<&Path>) -> Result<TlsParams, String> {
    let system = sslrootcert == Some("system");
    let mode = match sslmode {
        Some(text) => SslMode::parse(text).ok_or_else(|| {
            format!("sslmode \"{text}\" is not one of disable, allow, prefer, require, verify-ca, verify-full")
        })?,
        None if system => SslMode::VerifyFull,
        None => SslMode::Prefer,
    };
    if system && mode != SslMode::VerifyFull {
        return Err(format!(
            "weak sslmode \"{}\" may not be used with sslrootcert=system (use \"verify-full\")",
            mode.name()
        ));
    }
    let roots = match sslrootcert {
        Some("system") => Some(Roots::System),
        Some("") => None,
        Some(path) => Some(Roots::File(PathBuf::from(path))),
        None => home.map(|home| home.join(".postgresql/root.crt")).filter(|path| path.is_file()).map(Roots::File),
    };
    if mode.verifies() && roots.is_none() {
        return Err(format!(
            "sslmode={} checks the server's certificate and needs its CA: set sslrootcert to a PEM file \
             of it, or sslrootcert=system for the system's roots (~/.postgresql/root.crt, libpq's default, \
             does not exist)",
            mode.name()
        ));
    }
    Ok(TlsParams { mode, roots })
}

/// A connection string with `sslmode` and `sslrootcert` taken out.
#[derive(Debug, PartialEq, Eq)]
struct Split {
    rest: String,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

const TAKEN: [&str; 2] = ["sslmode", "sslrootcert"];

/// Takes the TLS parameters out of a URL's query or a `key=value` string; the last of a
/// repeated parameter wins, as in libpq. Everything else is left for tokio-postgres.
fn split(url: &str) -> Result<Split, String> {
    let mut taken: [Option<String>; 2] = [None, None];
    let mut take = |key: &str, value: String| match TAKEN.iter().position(|k| *k == key) {
        Some(i) => {
            taken[i] = Some(value);
            true
        }
        None => false,
    };
    let rest = if let Some(prefix) = ["postgres://", "postgresql://"].into_iter().find(|p| url.starts_with(p)) {
        // Where tokio-postgres's URL parser looks for the query: the first '?' after the
        // first '@' (a password may hold '?').
        let body = &url[prefix.len()..];
        let after_credentials = body.find('@').map_or(0, |at| at + 1);
        match body[after_credentials..].find('?') {
            None => url.to_owned(),
            Some(q) => {
                let q = after_credentials + q;
                let mut kept = Vec::new();
                for piece in body[q + 1..].split('&') {
                    let taken = match piece.split_once('=') {
                        Some((key, value)) => {
                            let key = percent_decode(key).map_err(|_| "a parameter name is not UTF-8".to_owned())?;
                            if TAKEN.contains(&key.as_str()) {
                                let value =
                                    percent_decode(value).map_err(|_| format!("the value of {key} is not UTF-8"))?;
                                take(&key, value)
                            } else {
                                false
                            }
                        }
                        None => false,
                    };
                    if !taken {
                        kept.push(piece);
                    }
                }
                let query = if kept.is_empty() { String::new() } else { format!("?{}", kept.join("&")) };
                format!("{prefix}{}{query}", &body[..q])
            }
        }
    } else {
        let mut kept = Vec::new();
        for (key, value) in conninfo_pairs(url)? {
            if !take(&key, value.clone()) {
                let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
                kept.push(format!("{key}='{quoted}'"));
            }
        }
        kept.join(" ")
    };
    let [sslmode, sslrootcert] = taken;
    Ok(Split { rest, sslmode, sslrootcert })
}

/// `%XX` decoding, as tokio-postgres decodes URL parts.
fn percent_decode(text: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
}

/// The `key = value` pairs of a libpq conninfo string (values bare or single-quoted, `\`
/// escaping the next character), read as tokio-postgres reads them.
fn conninfo_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::Chars>| {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            if chars.peek().is_some() {
                return Err("a parameter has no name".into());
            }
            return Ok(pairs);
        }
        skip_ws(&mut chars);
        if chars.next() != Some('=') {
            return Err(format!("`{key}` is not followed by `=`"));
        }
        skip_ws(&mut chars);
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(format!("the quoted value of `{key}` is not terminated")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Err(format!("`{key}` has no value"));
            }
        }
        pairs.push((key, value));
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_roots(roots: &Roots) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("reading sslrootcert {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("sslrootcert {} holds no PEM certificate", path.display()));
            }
            for cert in certs {
                store.add(cert).map_err(|e| format!("a certificate in sslrootcert {}: {e}", path.display()))?;
            }
        }
        Roots::System => {
            let (added, _) = store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if added == 0 {
                return Err("sslrootcert=system: no system root certificates were found".into());
            }
        }
    }
    Ok(store)
}

fn client_config(params: &TlsParams) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let roots = params.roots.as_ref().map(load_roots).transpose()?.map(Arc::new);
    let verifier = Arc::new(Verifier {
        roots,
        check_name: params.mode == SslMode::VerifyFull,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // What PostgreSQL 17 expects of a client that negotiates TLS directly; earlier servers
    // ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Arc::new(config))
}

/// Checks a server's certificate as the mode asks: nothing without roots, the chain with
/// them, and the host name too for `verify-full`. The handshake's signatures are always
/// checked against the certificate's key.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<RootCertStore>>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if self.check_name {
            if let Err(err) = rustls::client::verify_server_name(&cert, server_name) {
                // libpq falls back to the common name when there is no DNS or IP name.
                if !der::common_name_matches(end_entity, &server_name.to_str()) {
                    return Err(err);
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Connects with libpq's `sslmode`: what the pool ([`deadpool_postgres::Connect`]) and the
/// LISTEN connection use. Cheap to clone.
#[derive(Clone)]
pub struct PgConnector {
    /// The mode connections are made in (`disable` when every host is a Unix socket).
    mode: SslMode,
    tls: MakeRustls,
}

/// A connection made by a [`PgConnector`].
pub type PgConnection = Connection<Socket, RustlsStream<Socket>>;

impl PgConnector {
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Opens one connection to `config` (whose own `ssl_mode` is ignored), retrying as libpq
    /// does for `allow` and `prefer`.
    pub async fn open(&self, config: &tokio_postgres::Config) -> Result<(Client, PgConnection), tokio_postgres::Error> {
        use tokio_postgres::config::SslMode as Wire;
        match self.mode {
            SslMode::Disable => self.attempt(config, Wire::Disable).await.0,
            SslMode::Allow => match self.attempt(config, Wire::Disable).await.0 {
                // Refused in the clear (pg_hba.conf has only `hostssl` for us): try TLS.
                Err(err) if err.as_db_error().is_some() => self.attempt(config, Wire::Require).await.0,
                done => done,
            },
            SslMode::Prefer => match self.attempt(config, Wire::Prefer).await {
                (Err(err), attempt)
                    if attempt.started.load(Ordering::Relaxed)
                        && (attempt.failed.load(Ordering::Relaxed) || err.as_db_error().is_some()) =>
                {
                    tracing::warn!(error = %crate::PgError::from(err), "sslmode=prefer: PostgreSQL over TLS failed; connecting without TLS");
                    self.attempt(config, Wire::Disable).await.0
                }
                (done, _) => done,
            },
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => self.attempt(config, Wire::Require).await.0,
        }
    }

    /// One connection attempt in tokio-postgres's `mode`, and whether it tried TLS.
    async fn attempt(
        &self,
        config: &tokio_postgres::Config,
        mode: tokio_postgres::config::SslMode,
    ) -> (Result<(Client, PgConnection), tokio_postgres::Error>, Arc<Attempt>) {
        let mut config = config.clone();
        config.ssl_mode(mode);
        let attempt = Arc::new(Attempt::default());
        let tls = MakeRustls { attempt: attempt.clone(), ..self.tls.clone() };
        (config.connect(tls).await, attempt)
    }
}

impl deadpool_postgres::Connect for PgConnector {
    fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> futures::future::BoxFuture<'_, Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>> {
        let config = config.clone();
        Box::pin(async move {
            let (client, connection) = self.open(&config).await?;
            let driver = tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::warn!(target: "deadpool.postgres", "Connection error: {err}");
                }
            });
            Ok((client, driver))
        })
    }
}

/// What one connection attempt did with TLS.
#[derive(Default, Debug)]
struct Attempt {
    /// A TLS handshake was started (the server accepted the SSLRequest).
    started: AtomicBool,
    /// It failed.
    failed: AtomicBool,
}

/// tokio-postgres's [`MakeTlsConnect`] over tokio-rustls.
#[derive(Clone)]
pub struct MakeRustls {
    /// `None` when TLS is off (never used then).
    config: Option<Arc<rustls::ClientConfig>>,
    attempt: Arc<Attempt>,
    /// The TLS parameters, for error messages.
    context: Arc<str>,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    /// `domain` is the `host` the connection is for, the name `verify-full` checks; empty for
    /// a Unix socket (where tokio-postgres never starts TLS).
    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        Ok(RustlsConnect { make: self.clone(), domain: domain.to_owned() })
    }
}

/// One TLS handshake to come (see [`MakeRustls`]).
pub struct RustlsConnect {
    make: MakeRustls,
    domain: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let RustlsConnect { make, domain } = self;
            make.attempt.started.store(true, Ordering::Relaxed);
            let result = async {
                let config = make.config.clone().ok_or_else(|| io::Error::other("TLS to PostgreSQL is off"))?;
                let name = ServerName::try_from(domain.clone()).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("`{domain}` is not a host name TLS can check"))
                })?;
                tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await
                    .map_err(|err| explain(err, &domain, &make.context))
            }
            .await;
            if result.is_err() {
                make.attempt.failed.store(true, Ordering::Relaxed);
            }
            result.map(RustlsStream)
        })
    }
}

/// Says what a failed certificate check means for the operator.
fn explain(err: io::Error, host: &str, context: &str) -> io::Error {
    use rustls::CertificateError as E;
    let Some(rustls::Error::InvalidCertificate(cert)) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return err;
    };
    let what = match cert {
        E::UnknownIssuer | E::BadSignature | E::UnsupportedSignatureAlgorithmContext { .. } => {
            "PostgreSQL's certificate is not signed by a trusted CA".to_owned()
        }
        E::NotValidForName | E::NotValidForNameContext { .. } => {
            format!("PostgreSQL's certificate is not valid for the host name `{host}`")
        }
        _ => "PostgreSQL's certificate was refused".to_owned(),
    };
    io::Error::new(err.kind(), CertificateRefused(format!("{what} ({context}): {cert}")))
}

/// PostgreSQL's certificate failed the checks `sslmode` asks for.
#[derive(Debug)]
struct CertificateRefused(String);

impl std::fmt::Display for CertificateRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CertificateRefused {}

/// Whether `err` is a connection refused because of PostgreSQL's certificate (a
/// configuration to fix, not a database that is down).
pub fn certificate_refused(err: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(err);
    while let Some(err) = source {
        if err.is::<CertificateRefused>() {
            return true;
        }
        source = match err.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// A TLS connection to PostgreSQL.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    /// `tls-server-end-point` (RFC 5929): a hash of the server's certificate, by the hash of
    /// its signature algorithm (SHA-256 for MD5 and SHA-1), as PostgreSQL computes it.
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        let end_point =
            session.peer_certificates().and_then(|certs| certs.first()).and_then(|cert| der::end_point_hash(cert));
        match end_point {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// The little of a certificate's DER this module reads itself.
mod der {
    use sha2::Digest as _;

    /// One DER element at the start of `input`: its tag, its contents and what follows it.
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            (rest[..n].iter().fold(0usize, |len, b| (len << 8) | *b as usize), &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }

    /// The contents of the element at the start of `input` if it has tag `tag`, and the rest.
    fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (found, contents, rest) = element(input)?;
        (found == tag).then_some((contents, rest))
    }

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;

    /// tbsCertificate and signatureAlgorithm's OID.
    fn certificate(cert: &[u8]) -> Option<(&[u8], &[u8])> {
        let (cert, _) = expect(cert, SEQUENCE)?;
        let (tbs, rest) = expect(cert, SEQUENCE)?;
        let (algorithm, _) = expect(rest, SEQUENCE)?;
        let (oid, _) = expect(algorithm, OID)?;
        Some((tbs, oid))
    }

    pub fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
        const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
        const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
        let (_, oid) = certificate(cert)?;
        // md5, sha1, sha256, sha384, sha512 with RSA; ecdsa with sha1, sha256, sha384, sha512.
        let bits = match oid {
            _ if oid.starts_with(RSA) && oid.len() == RSA.len() + 1 => match oid[RSA.len()] {
                4 | 5 | 11 => 256,
                12 => 384,
                13 => 512,
                _ => return None,
            },
            _ if oid == [ECDSA, &[0x01]].concat() => 256,
            _ if oid.starts_with(ECDSA) && oid.len() == ECDSA.len() + 2 && oid[ECDSA.len()] == 0x03 => {
                match oid[ECDSA.len() + 1] {
                    2 => 256,
                    3 => 384,
                    4 => 512,
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some(match bits {
            256 => sha2::Sha256::digest(cert).to_vec(),
            384 => sha2::Sha384::digest(cert).to_vec(),
            _ => sha2::Sha512::digest(cert).to_vec(),
        })
    }

    /// tbsCertificate's subject and extensions.
    fn subject_and_extensions(tbs: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
        let mut rest = tbs;
        if rest.first() == Some(&0xa0) {
            rest = element(rest)?.2; // version
        }
        for _ in 0..4 {
            rest = element(rest)?.2; // serial, signature, issuer, validity
        }
        let (subject, mut rest) = expect(rest, SEQUENCE)?;
        let mut extensions = None;
        while let Some((tag, contents, next)) = element(rest) {
            if tag == 0xa3 {
                extensions = Some(expect(contents, SEQUENCE)?.0);
            }
            rest = next;
        }
        Some((subject, extensions))
    }

    /// Whether the certificate has a subjectAltName with a DNS name or an IP address.
    fn has_name_alternatives(mut extensions: &[u8]) -> Option<bool> {
        const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
        while !extensions.is_empty() {
            let (extension, rest) = expect(extensions, SEQUENCE)?;
            extensions = rest;
            let (oid, mut fields) = expect(extension, OID)?;
            if oid != SUBJECT_ALT_NAME {
                continue;
            }
            if fields.first() == Some(&0x01) {
                fields = element(fields)?.2; // critical
            }
            let (value, _) = expect(fields, 0x04)?;
            let (mut names, _) = expect(value, SEQUENCE)?;
            while let Some((tag, _, rest)) = element(names) {
                // dNSName [2], iPAddress [7]
                if tag == 0x82 || tag == 0x87 {
                    return Some(true);
                }
                names = rest;
            }
        }
        Some(false)
    }

    /// libpq's fallback for a certificate without DNS or IP names: the subject's common name
    /// equals `host` (ignoring ASCII case; `*.` matches one leading label).
    pub fn common_name_matches(cert: &[u8], host: &str) -> bool {
        let Some((tbs, _)) = certificate(cert) else { return false };
        let Some((mut subject, extensions)) = subject_and_extensions(tbs) else { return false };
        match extensions.map(has_name_alternatives) {
            None | Some(Some(false)) => {}
            Some(_) => return false,
        }
        const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
        let mut names = Vec::new();
        while let Some((set, rest)) = expect(subject, SET) {
            subject = rest;
            let mut set = set;
            while let Some((attribute, rest)) = expect(set, SEQUENCE) {
                set = rest;
                if let Some((COMMON_NAME, value)) = expect(attribute, OID) {
                    if let Some((_, text, _)) = element(value) {
                        names.push(text);
                    }
                }
            }
        }
        // Only one common name, as libpq requires.
        let [name] = names[..] else { return false };
        let Ok(name) = std::str::from_utf8(name) else { return false };
        if name.contains('\0') {
            return false;
        }
        let host = host.to_ascii_lowercase();
        let name = name.to_ascii_lowercase();
        match name.strip_prefix("*.") {
            Some(suffix) => host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => host == name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_only_the_tls_parameters() {
        let parts = split("postgres://u:p%3F@h:5/db?application_name=x&sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&connect_timeout=3").unwrap();
        assert_eq!(parts.rest, "postgres://u:p%3F@h:5/db?application_name=x&connect_timeout=3");
        assert_eq!(parts.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(parts.sslrootcert.as_deref(), Some("/tmp/ca.pem"));
        let parts = split("postgresql://u:pa?ss&sslmode=x@h/db?sslmode=require").unwrap();
        assert_eq!(parts.rest, "postgresql://u:pa?ss&sslmode=x@h/db");
        assert_eq!(parts.sslmode.as_deref(), Some("require"));
        let parts = split("postgres://h/db").unwrap();
        assert_eq!((parts.rest.as_str(), parts.sslmode), ("postgres://h/db", None));
    }

    #[test]
    fn conninfo_strings_lose_only_the_tls_parameters() {
        let parts = split("host=h  password='it s' sslmode = verify-ca sslrootcert='/a b/ca.pem' user=u\\ v").unwrap();
        assert_eq!(parts.rest, "host='h' password='it s' user='u v'");
        assert_eq!(parts.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(parts.sslrootcert.as_deref(), Some("/a b/ca.pem"));
        let parts = split("host=h password='a\\'b\\\\c'").unwrap();
        assert_eq!(parts.rest, "host='h' password='a\\'b\\\\c'");
        let config: tokio_postgres::Config = parts.rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"a'b\\c"[..]));
    }

    #[test]
    fn libpq_rules_for_modes_and_roots() {
        let no_home = None;
        let resolve_ok = |mode, root| resolve(mode, root, no_home).unwrap();
        assert_eq!(resolve_ok(None, None), TlsParams { mode: SslMode::Prefer, roots: None });
        assert_eq!(resolve_ok(Some("require"), None), TlsParams { mode: SslMode::Require, roots: None });
        assert_eq!(
            resolve_ok(Some("require"), Some("/ca.pem")),
            TlsParams { mode: SslMode::Require, roots: Some(Roots::File("/ca.pem".into())) }
        );
        assert_eq!(
            resolve_ok(None, Some("system")),
            TlsParams { mode: SslMode::VerifyFull, roots: Some(Roots::System) }
        );
        let weak = resolve(Some("require"), Some("system"), no_home).unwrap_err();
        assert!(weak.contains("weak sslmode \"require\""), "{weak}");
        let none = resolve(Some("verify-full"), None, no_home).unwrap_err();
        assert!(none.contains("sslrootcert"), "{none}");
        let bad = resolve(Some("verify_full"), None, no_home).unwrap_err();
        assert!(bad.contains("verify_full") && bad.contains("verify-full"), "{bad}");
        // libpq's default root file.
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        assert_eq!(
            resolve(Some("verify-ca"), None, Some(home.path())).unwrap_err(),
            none.replace("verify-full", "verify-ca")
        );
        std::fs::write(home.path().join(".postgresql/root.crt"), "").unwrap();
        assert_eq!(
            resolve(None, None, Some(home.path())).unwrap(),
            TlsParams { mode: SslMode::Prefer, roots: Some(Roots::File(home.path().join(".postgresql/root.crt"))) }
        );
    }

    #[test]
    fn errors_never_quote_the_password() {
        for url in [
            "postgres://u:s3cret@h/db?sslmode=bogus",
            "postgres://u:s3cret@h/db?sslmode=verify-full",
            "postgres://u:s3cret@h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem",
            "postgres://u:s3cret@h/db?sslmode=require&sslrootcert=system",
            "postgres://u:s3cret@h/db?sslmode=require&sslrootcert=%FF",
            "postgres://u:s3cret@h/db?sslcert=/x",
            "postgres://u:s3cret@h:port/db",
            "host=h password=s3cret sslmode=bogus",
            "host=h password='s3cret",
            "host=h password=s3cret =",
        ] {
            let err = match parse(url) {
                Ok(_) => panic!("{url} parsed"),
                Err(err) => err.to_string(),
            };
            assert!(!err.contains("s3cret"), "{url}: {err}");
        }
    }

    fn cert(names: &[&str], common_name: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    #[test]
    fn the_common_name_counts_only_without_dns_or_ip_names() {
        let cn_only = cert(&[], "db.example");
        assert!(der::common_name_matches(&cn_only, "db.example"));
        assert!(der::common_name_matches(&cn_only, "DB.Example"));
        assert!(!der::common_name_matches(&cn_only, "other.example"));
        let wildcard = cert(&[], "*.example");
        assert!(der::common_name_matches(&wildcard, "db.example"));
        assert!(!der::common_name_matches(&wildcard, "a.db.example"));
        assert!(!der::common_name_matches(&wildcard, "example"));
        // With subject alternative names the common name is ignored.
        assert!(!der::common_name_matches(&cert(&["other.example"], "db.example"), "db.example"));
        assert!(!der::common_name_matches(&cert(&["10.0.0.1"], "db.example"), "db.example"));
    }

    #[test]
    fn channel_binding_hashes_the_certificate_by_its_signature_hash() {
        use sha2::Digest as _;
        let der = cert(&["db.example"], "db.example"); // ECDSA P-256 with SHA-256
        assert_eq!(der::end_point_hash(&der), Some(sha2::Sha256::digest(&der).to_vec()));
        assert_eq!(der::end_point_hash(b"not a certificate"), None);
    }

    #[test]
    fn unix_sockets_never_use_tls() {
        let (_, connector) = parse("host=/run/postgresql sslmode=verify-full sslrootcert=/nonexistent").unwrap();
        assert_eq!(connector.mode(), SslMode::Disable);
    }
}
