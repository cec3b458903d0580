//! `chime config get|set|delete|list`: live settings in etcd. `set` checks the value
//! the way every process will (so a refused value never reaches etcd from here);
//! `etcdctl put` works too, and a bad value written that way is refused by the
//! processes, which keep the last good one.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chime_coordinator::audit::{self, Change};
use chime_coordinator::model::AuditAction;
use chime_shared::config as live;
use chime_shared::config::source::{ConfigSource, EtcdSource, Expect};
use clap::Subcommand;
use serde_json::json;

use crate::config::{self, ClientConfig};
use crate::{StoreArgs, init_logging};

/// `chime config` arguments.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(subcommand)]
    cmd: ConfigCmd,
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Print one setting (key relative to the prefix, e.g. queues/default/count).
    Get {
        /// Key.
        key: String,
    },
    /// Check and write one setting.
    Set {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Delete one setting (back to the default).
    Delete {
        /// Key.
        key: String,
    },
    /// Print every setting and the settings in force.
    List,
    /// Print the documented default configuration file of a process
    /// (coordinator, worker or client); needs no server.
    Example {
        /// coordinator, worker or client.
        process: String,
    },
}

/// The client config of `store` (file, env, flags) and its etcd source: what
/// `chime config` and `chime alert` both talk to.
pub(crate) async fn etcd_source(
    store: &StoreArgs,
) -> Result<(ClientConfig, Arc<dyn ConfigSource>)> {
    let mut cfg: ClientConfig = config::load(store.config.as_deref(), config::chime_env())?;
    store.apply(&mut cfg.redis, &mut cfg.queue, &mut cfg.etcd);
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
    Ok((cfg, source))
}

/// Who the audit log names for a change this CLI writes straight to etcd:
/// `cli:<user>@<host>` (no token is presented to etcd; its credentials are the
/// process's).
pub(crate) fn audit_who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}@{host}")
}

/// Writes `writes` and deletes `deletes` in one etcd transaction together with the
/// audit entries of `changes` (one inbox key; the leader moves it into the log),
/// so a change is never in etcd without its entry. Answers the revision, or
/// `None` when a condition of `writes` failed (nothing written).
pub(crate) async fn commit_audited(
    source: &dyn ConfigSource,
    mut writes: Vec<(String, String, Expect)>,
    deletes: &[String],
    changes: Vec<Change>,
) -> Result<Option<i64>> {
    if !changes.is_empty() {
        let (who, now) = (audit_who(), chime_shared::clock::system_now_ms());
        let entries: Vec<_> = changes
            .into_iter()
            .map(|c| audit::entry_of(c, who.clone(), now))
            .collect();
        writes.push(audit::inbox_write(&entries)?);
    }
    Ok(source.commit(&writes, deletes).await?)
}

/// Runs a `chime config` subcommand.
pub async fn run(args: ConfigArgs) -> Result<()> {
    if let ConfigCmd::Example { process } = &args.cmd {
        let Some((_, text)) = config::EXAMPLES.iter().find(|e| e.0 == process) else {
            bail!("unknown process {process:?}: coordinator, worker or client");
        };
        print!("{text}");
        return Ok(());
    }
    let (_, source) = etcd_source(&args.store).await?;
    let out = match args.cmd {
        ConfigCmd::Get { key } => {
            let snap = source.load().await?;
            match snap.entries.iter().find(|(k, _, _)| *k == key) {
                Some((k, v, rev)) => json!({ "key": k, "value": v, "revision": rev }),
                None => bail!("{key} is not set"),
            }
        }
        ConfigCmd::Set { key, value } => {
            live::parse(&key, Some(&value)).map_err(|r| anyhow::anyhow!("invalid {r}"))?;
            let value = value.trim();
            let mut change = Change::new(AuditAction::ConfigSet, &key).after(value);
            change.before = source.get(&key).await?.map(|(v, _)| v.into());
            let write = (key.clone(), value.to_owned(), Expect::Any);
            let revision = commit_audited(source.as_ref(), vec![write], &[], vec![change]).await?;
            json!({ "key": key, "value": value, "revision": revision })
        }
        ConfigCmd::Delete { key } => {
            live::parse(&key, None).map_err(|r| anyhow::anyhow!("invalid {r}"))?;
            // Only a setting that was there is a change worth an entry.
            let changes = match source.get(&key).await? {
                Some((before, _)) => {
                    vec![Change::new(AuditAction::ConfigDelete, &key).before(before)]
                }
                None => Vec::new(),
            };
            let revision = commit_audited(
                source.as_ref(),
                Vec::new(),
                std::slice::from_ref(&key),
                changes,
            )
            .await?;
            json!({ "key": key, "deleted": true, "revision": revision })
        }
        ConfigCmd::List => serde_json::to_value(live::listing(&source.load().await?))?,
        ConfigCmd::Example { .. } => unreachable!("answered above"),
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
