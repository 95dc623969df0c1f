//! `capsync admin ...`.

use super::{format_ms, AdminRef};
use anyhow::Context as _;
use capsync_client::Connection;
use capsync_schema::capsync_capnp::admin;
use capsync_schema::SturdyUri;
use clap::{Args, Subcommand};
use serde_json::json;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct AdminArgs {
    #[command(flatten)]
    admin: AdminRef,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Create a session and print its owner's sturdy URI.
    CreateSession {
        #[arg(long, default_value = "")]
        title: String,
    },
    /// List sessions.
    ListSessions {
        #[arg(long)]
        json: bool,
    },
    /// List shares, of one session or of all.
    ListShares {
        #[arg(long, value_name = "ID")]
        session: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a share and every share minted below it.
    RevokeShare { id: String },
    /// Revoke a session: its owner token and every share of it.
    RevokeSession { id: String },
    /// Print the audit log.
    Audit {
        /// Only entries with a larger id.
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Print server statistics.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Create a space and print its sturdy URI: its holder can open sessions (e.g. `capsync
    /// import ... --space URI`) without the admin URI.
    CreateSpace {
        /// A label shown by `admin list-spaces`.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List spaces with the number of sessions opened through each.
    ListSpaces {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a space: its URI, every session URI opened through it and every share minted
    /// below those stop working (the sessions and their data stay).
    RevokeSpace { id: String },
    /// Mint a share of any session (e.g. one opened through a space) and print its sturdy URI.
    MintShare {
        /// The session's id (see `admin list-sessions`).
        session: String,
        /// Comma-separated rights: read, append, mint.
        #[arg(long, value_parser = super::share::parse_rights)]
        rights: capsync_persistence::Rights,
        /// A label shown by `admin list-shares`.
        #[arg(long, default_value = "")]
        label: String,
        /// How long the share lives (90s, 30m, 1h, 7d); by default it never expires.
        #[arg(long, value_parser = super::parse_duration)]
        ttl: Option<u64>,
    },
}

pub fn load_admin_uri(admin: &AdminRef) -> anyhow::Result<SturdyUri> {
    let text = match &admin.admin {
        Some(uri) => return Ok(uri.clone()),
        None => std::fs::read_to_string(&admin.admin_file)
            .with_context(|| format!("cannot read the admin URI from {}", admin.admin_file.display()))?,
    };
    SturdyUri::parse(&text).context("the admin URI")
}

pub async fn run(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let uri = load_admin_uri(&args.admin)?;
    let conn = Connection::connect(&uri, args.admin.tls.tls_ca.as_deref()).await?;
    let (admin, grant) = conn.admin(&uri.token);
    let mut outcome = command(&admin, &uri, args.command).await;
    if outcome.is_err() {
        // A session or share URI redeems fine but holds no admin object: say so, rather than
        // the bare RPC error a call on the missing capability gives.
        if let Ok(info) = grant.await {
            if info.kind != "admin" {
                outcome = Err(anyhow::anyhow!(
                    "this is not an admin URI: it grants a {}; use the server's admin URI (<data-dir>/admin.uri)",
                    info.kind
                ));
            }
        }
    }
    conn.close().await;
    outcome.map(|()| ExitCode::SUCCESS)
}

fn rpc<T>(result: Result<T, capnp::Error>) -> anyhow::Result<T> {
    result.map_err(|e| capsync_client::ClientError::from(e).into())
}

/// A text field of a server answer.
pub fn text(field: capnp::Result<capnp::text::Reader<'_>>) -> anyhow::Result<String> {
    rpc(field)?.to_string().map_err(|_| anyhow::anyhow!("the server sent text that is not UTF-8"))
}

async fn command(admin: &admin::Client, uri: &SturdyUri, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::CreateSession { title } => {
            let mut request = admin.create_session_request();
            request.get().set_title(title.as_str());
            let response = rpc(request.send().promise.await)?;
            let results = rpc(response.get())?;
            let token = capsync_schema::Token::parse(&text(results.get_token())?)?;
            let owner = SturdyUri::new(uri.address.clone(), token).with_tls(uri.tls);
            eprintln!("created session {}", &text(results.get_session_id())?);
            println!("{}", owner.expose());
        }
        AdminCommand::ListSessions { json } => {
            let response = rpc(admin.list_sessions_request().send().promise.await)?;
            let sessions = rpc(rpc(response.get())?.get_sessions())?;
            let mut rows = Vec::new();
            for s in sessions.iter() {
                rows.push(json!({
                    "session_id": text(s.get_session_id())?,
                    "title": text(s.get_title())?,
                    "cursor": s.get_cursor(),
                    "epoch": s.get_epoch(),
                    "created_at": s.get_created_at(),
                    "shares": s.get_share_count(),
                }));
            }
            if json {
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!("{:<36}  {:>8}  {:>6}  {:>5}  {:<20}  TITLE", "SESSION", "CURSOR", "SHARES", "EPOCH", "CREATED");
                for r in rows {
                    println!(
                        "{:<36}  {:>8}  {:>6}  {:>5}  {:<20}  {}",
                        r["session_id"].as_str().unwrap_or(""),
                        r["cursor"],
                        r["shares"],
                        r["epoch"],
                        format_ms(r["created_at"].as_u64().unwrap_or(0)),
                        r["title"].as_str().unwrap_or("")
                    );
                }
            }
        }
        AdminCommand::ListShares { session, json } => {
            let mut request = admin.list_shares_request();
            request.get().set_session_id(session.as_deref().unwrap_or(""));
            let response = rpc(request.send().promise.await)?;
            let shares = rpc(rpc(response.get())?.get_shares())?;
            let mut rows = Vec::new();
            for s in shares.iter() {
                let r = rpc(s.get_rights())?;
                let rights = capsync_persistence::Rights { read: r.get_read(), append: r.get_append(), mint: r.get_mint() };
                rows.push(json!({
                    "share_id": text(s.get_share_id())?,
                    "session_id": text(s.get_session_id())?,
                    "parent_share_id": text(s.get_parent_share_id())?,
                    "label": text(s.get_label())?,
                    "rights": rights.names(),
                    "epoch": s.get_epoch(),
                    "revoked": s.get_revoked(),
                    "created_at": s.get_created_at(),
                    "expires_at": s.get_expires_at(),
                    "last_used_at": s.get_last_used_at(),
                }));
            }
            if json {
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!("{:<36}  {:<36}  {:<17}  {:<7}  {:<20}  LABEL", "SHARE", "SESSION", "RIGHTS", "STATE", "EXPIRES");
                for r in rows {
                    println!(
                        "{:<36}  {:<36}  {:<17}  {:<7}  {:<20}  {}",
                        r["share_id"].as_str().unwrap_or(""),
                        r["session_id"].as_str().unwrap_or(""),
                        r["rights"].as_str().unwrap_or(""),
                        if r["revoked"].as_bool().unwrap_or(false) { "revoked" } else { "active" },
                        format_ms(r["expires_at"].as_u64().unwrap_or(0)),
                        r["label"].as_str().unwrap_or("")
                    );
                }
            }
        }
        AdminCommand::RevokeShare { id } => {
            let mut request = admin.revoke_share_request();
            request.get().set_share_id(id.as_str());
            let response = rpc(request.send().promise.await)?;
            println!("revoked share {id} (epoch {})", rpc(response.get())?.get_epoch());
        }
        AdminCommand::RevokeSession { id } => {
            let mut request = admin.revoke_session_request();
            request.get().set_session_id(id.as_str());
            let response = rpc(request.send().promise.await)?;
            println!("revoked session {id} (epoch {})", rpc(response.get())?.get_epoch());
        }
        AdminCommand::Audit { since, limit, json } => {
            let mut request = admin.audit_request();
            request.get().set_since(since);
            request.get().set_limit(limit);
            let response = rpc(request.send().promise.await)?;
            let entries = rpc(rpc(response.get())?.get_entries())?;
            for e in entries.iter() {
                let row = json!({
                    "id": e.get_id(),
                    "at": e.get_at(),
                    "action": text(e.get_action())?,
                    "target_kind": text(e.get_target_kind())?,
                    "target_id": text(e.get_target_id())?,
                    "session_id": text(e.get_session_id())?,
                    "peer": text(e.get_peer())?,
                    "detail": text(e.get_detail())?,
                });
                if json {
                    println!("{row}");
                } else {
                    println!(
                        "{:>6}  {}  {:<14}  {:<7} {:<36}  {:<21}  {}",
                        row["id"],
                        format_ms(e.get_at()),
                        row["action"].as_str().unwrap_or(""),
                        row["target_kind"].as_str().unwrap_or(""),
                        row["target_id"].as_str().unwrap_or(""),
                        row["peer"].as_str().unwrap_or(""),
                        row["detail"].as_str().unwrap_or("")
                    );
                }
            }
        }
        AdminCommand::CreateSpace { label } => {
            let mut request = admin.create_space_request();
            request.get().set_label(label.as_str());
            let response = rpc(request.send().promise.await)?;
            let results = rpc(response.get())?;
            let token = capsync_schema::Token::parse(&text(results.get_token())?)?;
            let space = SturdyUri::new(uri.address.clone(), token).with_tls(uri.tls);
            eprintln!("created space {}", &text(results.get_space_id())?);
            println!("{}", space.expose());
        }
        AdminCommand::ListSpaces { json } => {
            let response = rpc(admin.list_spaces_request().send().promise.await)?;
            let spaces = rpc(rpc(response.get())?.get_spaces())?;
            let mut rows = Vec::new();
            for s in spaces.iter() {
                rows.push(json!({
                    "space_id": text(s.get_space_id())?,
                    "label": text(s.get_label())?,
                    "epoch": s.get_epoch(),
                    "revoked": s.get_revoked(),
                    "created_at": s.get_created_at(),
                    "sessions": s.get_session_count(),
                }));
            }
            if json {
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!("{:<36}  {:>8}  {:<7}  {:>5}  {:<20}  LABEL", "SPACE", "SESSIONS", "STATE", "EPOCH", "CREATED");
                for r in rows {
                    println!(
                        "{:<36}  {:>8}  {:<7}  {:>5}  {:<20}  {}",
                        r["space_id"].as_str().unwrap_or(""),
                        r["sessions"],
                        if r["revoked"].as_bool().unwrap_or(false) { "revoked" } else { "active" },
                        r["epoch"],
                        format_ms(r["created_at"].as_u64().unwrap_or(0)),
                        r["label"].as_str().unwrap_or("")
                    );
                }
            }
        }
        AdminCommand::RevokeSpace { id } => {
            let mut request = admin.revoke_space_request();
            request.get().set_space_id(id.as_str());
            let response = rpc(request.send().promise.await)?;
            println!("revoked space {id} (epoch {})", rpc(response.get())?.get_epoch());
        }
        AdminCommand::MintShare { session, rights, label, ttl } => {
            let mut request = admin.mint_share_request();
            {
                let mut params = request.get();
                params.set_session_id(session.as_str());
                capsync_schema::wire::set_rights(params.reborrow().init_rights(), rights);
                params.set_label(label.as_str());
                params.set_ttl_seconds(ttl.unwrap_or(0));
            }
            let response = rpc(request.send().promise.await)?;
            let results = rpc(response.get())?;
            let token = capsync_schema::Token::parse(&text(results.get_token())?)?;
            eprintln!("minted share {} of session {session}", &text(results.get_share_id())?);
            println!("{}", SturdyUri::new(uri.address.clone(), token).with_tls(uri.tls).expose());
        }
        AdminCommand::Stats { json } => {
            let response = rpc(admin.stats_request().send().promise.await)?;
            let s = rpc(rpc(response.get())?.get_stats())?;
            let stats = json!({
                "sessions": s.get_sessions(),
                "shares": s.get_shares(),
                "ops": s.get_ops(),
                "connections": s.get_connections(),
                "live_capabilities": s.get_live_capabilities(),
                "subscriptions": s.get_subscriptions(),
                "store": text(s.get_store())?,
            });
            if json {
                println!("{stats}");
            } else if let Some(map) = stats.as_object() {
                for (k, v) in map {
                    println!("{k:<18} {v}");
                }
            }
        }
    }
    Ok(())
}
