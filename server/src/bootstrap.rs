//! The admin sturdy URI in `<data-dir>/admin.uri`.
//!
//! On first start the server creates the admin object, mints its token and writes
//! `capsync://HOST:PORT/TOKEN` to `admin.uri` with mode 0600 (the file is created 0600 before
//! the token is written into it). HOST:PORT is `--advertise` if given, else the listen address.
//! On later starts it keeps the token in the file and only rewrites the address if it
//! changed. If the file is gone or holds a token that no longer works, a new admin token is
//! minted ([`Store::renew_admin`]): on SQLite the admin epoch is bumped first (every older
//! admin token dies); on PostgreSQL, which several nodes share, it is minted at the epoch in
//! force, beside the other nodes' tokens. The token is never logged.

use crate::access::Access;
use crate::error::Result;
use crate::registry::EpochRegistry;
use crate::store::{now_ms, Store};
use capsync_persistence::server::{TargetKind, TokenRow};
use capsync_persistence::Rights;
use capsync_schema::{SturdyUri, Token};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use tracing::info;

pub const ADMIN_URI_FILE: &str = "admin.uri";

/// The address clients should dial: a wildcard listen address becomes loopback.
pub fn dial_address(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

/// Makes sure `<data_dir>/admin.uri` holds a working admin token with `address` (the one
/// clients should dial) and the TLS flag.
pub async fn ensure_admin_uri(store: &dyn Store, registry: &EpochRegistry, data_dir: &Path, address: String, tls: bool) -> Result<()> {
    let path = data_dir.join(ADMIN_URI_FILE);
    if let Some(existing) = std::fs::read_to_string(&path).ok().and_then(|t| SturdyUri::parse(&t).ok()) {
        let ticket = registry.ticket();
        let resolution = store.resolve_token(existing.token.hash().0).await?;
        let valid = resolution.as_ref().is_some_and(|r| {
            r.token.target_kind == TargetKind::Admin && Access::from_resolution(r, &ticket).is_ok()
        });
        drop(ticket);
        if valid {
            if existing.address != address || existing.tls != tls {
                write_private(&path, &SturdyUri::new(address, existing.token).with_tls(tls).expose())?;
                info!(file = %path.display(), "admin URI address updated");
            }
            return Ok(());
        }
    }
    let token = Token::generate();
    let row = TokenRow {
        hash: token.hash().0,
        target_kind: TargetKind::Admin,
        target_id: "admin".into(),
        minted_epoch: 0,
        rights: Rights::default(),
        parent: "server".into(),
        label: "admin".into(),
        created_at: now_ms(),
        expires_at: 0,
        last_used_at: 0,
        space: None,
    };
    let epoch = store.renew_admin(row).await?;
    registry.bump(crate::registry::ObjectKey::Admin, epoch);
    write_private(&path, &SturdyUri::new(address, token).with_tls(tls).expose())?;
    info!(file = %path.display(), epoch, "admin URI written");
    Ok(())
}

/// Writes `contents` to `path` atomically through a temporary file that is 0600 from birth.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("uri.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
