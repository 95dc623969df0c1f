//! `capsync share URI --rights ...`.

use capsync_client::{ClientError, Connection};
use capsync_persistence::Rights;
use capsync_schema::{SturdyUri, Token};
use clap::Args;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ShareArgs {
    /// Sturdy URI of the session or share to mint from (needs the mint right), or the name of
    /// a ref attached in the outbox (`codex:<id>`).
    #[arg(value_parser = super::TargetParser, value_name = "URI|REF")]
    target: super::Target,
    /// Comma-separated rights of the new share: read, append, mint.
    #[arg(long, value_parser = parse_rights)]
    rights: Rights,
    /// A label shown by `admin list-shares`.
    #[arg(long, default_value = "")]
    label: String,
    /// How long the share lives (90s, 30m, 1h, 7d); by default as long as its parent.
    #[arg(long, value_parser = super::parse_duration)]
    ttl: Option<u64>,
    /// The outbox where a ref name is looked up (and --tls-ca).
    #[command(flatten)]
    outbox: super::client::OutboxArg,
}

pub(super) fn parse_rights(text: &str) -> Result<Rights, String> {
    let mut rights = Rights::default();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name {
            "read" => rights.read = true,
            "append" => rights.append = true,
            "mint" => rights.mint = true,
            other => return Err(format!("unknown right `{other}`; use read, append and mint")),
        }
    }
    if rights == Rights::default() {
        return Err("name at least one right".into());
    }
    Ok(rights)
}

pub async fn run(args: ShareArgs) -> anyhow::Result<ExitCode> {
    let uri = match args.target {
        super::Target::Uri(uri) => uri,
        super::Target::Ref(name) => {
            let client = args.outbox.open()?;
            if !client.has_ref(&name)? {
                anyhow::bail!("no ref named {name} in the outbox (`capsync status` lists them)");
            }
            client.ref_uri(&name)?
        }
    };
    let conn = Connection::connect(&uri, args.outbox.tls.tls_ca.as_deref()).await?;
    let (session, _grant) = conn.session(&uri.token);
    let mut request = session.mint_request();
    {
        let mut params = request.get();
        capsync_schema::wire::set_rights(params.reborrow().init_rights(), args.rights);
        params.set_label(args.label.as_str());
        params.set_ttl_seconds(args.ttl.unwrap_or(0));
    }
    let response = request.send().promise.await.map_err(ClientError::from)?;
    let results = response.get().map_err(ClientError::from)?;
    let token = Token::parse(&super::admin::text(results.get_token())?)?;
    let share_id = super::admin::text(results.get_share_id())?;
    eprintln!("minted share {share_id}");
    println!("{}", SturdyUri::new(uri.address.clone(), token).with_tls(uri.tls).expose());
    conn.close().await;
    Ok(ExitCode::SUCCESS)
}
