//! `chime alert list|get|put|delete`: alert rules in etcd (`<prefix>alerts/<name>`).
//! `put` checks a rule the way the coordinators will (so a refused rule never
//! reaches etcd from here) and prints the stored rule; the leader picks a change up
//! within a second. Changes made here go straight to etcd and are not in the audit
//! log; the console and the JSON API (`PUT /api/alerts/<name>`) record theirs.

use std::io::Read;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chime_coordinator::alerts::rule::{AlertRule, key};
use chime_shared::config::source::{ConfigSource, EtcdSource};
use clap::Subcommand;
use serde_json::json;

use crate::config::{self, ClientConfig};
use crate::{StoreArgs, init_logging};

/// `chime alert` arguments.
#[derive(Debug, clap::Args)]
pub struct AlertArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(subcommand)]
    cmd: AlertCmd,
}

#[derive(Debug, Subcommand)]
enum AlertCmd {
    /// Print every rule (one JSON line each).
    List,
    /// Print one rule.
    Get {
        /// Rule name.
        name: String,
    },
    /// Check and store a rule (JSON, from a file or `-` for stdin); replaces a rule
    /// of the same name.
    Put {
        /// File holding the rule's JSON, or `-`.
        file: String,
    },
    /// Delete a rule.
    Delete {
        /// Rule name.
        name: String,
    },
}

/// Runs a `chime alert` subcommand.
pub async fn run(args: AlertArgs) -> Result<()> {
    let mut cfg: ClientConfig = config::load(args.store.config.as_deref(), config::chime_env())?;
    args.store
        .apply(&mut cfg.redis, &mut cfg.queue, &mut cfg.etcd);
    init_logging(&cfg.log.format, "warn");
    let Some(spec) = cfg.etcd.spec()? else {
        bail!(
            "no etcd configured: give --etcd-endpoints (or etcd.endpoints, CHIME_ETCD_ENDPOINTS)"
        );
    };
    let client = spec
        .connect()
        .await
        .with_context(|| format!("connecting to etcd at {}", cfg.etcd.endpoints))?;
    let source: Arc<dyn ConfigSource> = Arc::new(EtcdSource::new(client, cfg.etcd.prefix.clone()));
    match args.cmd {
        AlertCmd::List => {
            let snap = source.load().await?;
            for (k, v, rev) in &snap.entries {
                if k.starts_with("alerts/") {
                    let rule: serde_json::Value =
                        serde_json::from_str(v).unwrap_or_else(|_| json!({ "unreadable": v }));
                    println!("{}", json!({ "rule": rule, "revision": rev }));
                }
            }
        }
        AlertCmd::Get { name } => match source.get(&key(&name)).await? {
            Some((v, rev)) => {
                let rule: serde_json::Value = serde_json::from_str(&v)?;
                println!("{}", json!({ "rule": rule, "revision": rev }));
            }
            None => bail!("alert rule {name:?} not found"),
        },
        AlertCmd::Put { file } => {
            let mut text = Vec::new();
            if file == "-" {
                std::io::stdin().read_to_end(&mut text)?;
            } else {
                text = std::fs::read(&file).with_context(|| format!("reading {file}"))?;
            }
            let rule = AlertRule::parse(&text, &cfg.queue.family)?;
            let revision = source
                .put(&key(&rule.name), &serde_json::to_string(&rule)?)
                .await?;
            println!("{}", json!({ "rule": rule, "revision": revision }));
        }
        AlertCmd::Delete { name } => {
            if source.get(&key(&name)).await?.is_none() {
                bail!("alert rule {name:?} not found");
            }
            let revision = source.delete(&key(&name)).await?;
            println!("{}", json!({ "deleted": name, "revision": revision }));
        }
    }
    Ok(())
}
