//! `chime alert list|get|put|apply|delete`: alert rules in etcd
//! (`<prefix>alerts/<name>`). `put` and `apply` check rules the way the coordinators
//! will (so a refused rule never reaches etcd from here); the leader picks a change
//! up within a second. `apply` is the declarative form (the Helm chart's hook runs
//! it): every rule of a file or directory, checked first, written in one etcd
//! transaction (all or none), unchanged ones left alone, and with `--prune` the
//! rules not given deleted. Changes made here go straight to etcd and are not in the audit
//! log; the console and the JSON API (`PUT /api/alerts/<name>`) record theirs.

use std::io::Read;

use anyhow::{Context, Result, bail};
use chime_coordinator::alerts::rule::{AlertRule, key};
use chime_coordinator::audit::Change;
use chime_coordinator::model::AuditAction;
use chime_shared::config::source::Expect;
use clap::Subcommand;
use serde_json::json;

use crate::StoreArgs;
use crate::cmd_config::commit_audited;

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
    /// Check every rule of a JSON file (one rule or an array of rules) or of a
    /// directory's `*.json` files, then store them in one transaction (all or none);
    /// rules already stored as given are left alone.
    Apply {
        /// File or directory.
        path: String,
        /// Also delete the stored rules that are not given.
        #[arg(long)]
        prune: bool,
    },
    /// Delete a rule.
    Delete {
        /// Rule name.
        name: String,
    },
}

/// The rules of `path`: a JSON file holding one rule or an array, or a directory
/// of such files (`*.json`, in name order). Each is checked; a name given twice is
/// refused.
fn rules_at(path: &std::path::Path, family: &str) -> Result<Vec<AlertRule>> {
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "json") {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut rules: Vec<AlertRule> = Vec::new();
    for f in files {
        let text = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        let value: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("{}: not JSON", f.display()))?;
        let items = match value {
            serde_json::Value::Array(items) => items,
            one => vec![one],
        };
        for (i, item) in items.iter().enumerate() {
            let rule = AlertRule::parse(item.to_string().as_bytes(), family)
                .with_context(|| format!("{} (rule {i})", f.display()))?;
            if rules.iter().any(|r| r.name == rule.name) {
                bail!(
                    "{} (rule {i}): the name {:?} is given twice",
                    f.display(),
                    rule.name
                );
            }
            rules.push(rule);
        }
    }
    Ok(rules)
}

/// Runs a `chime alert` subcommand.
pub async fn run(args: AlertArgs) -> Result<()> {
    let (cfg, source) = crate::cmd_config::etcd_source(&args.store).await?;
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
            let k = key(&rule.name);
            let mut change = Change::new(AuditAction::AlertPut, &rule.name).after(rule.redacted());
            change.before = before_rule(source.as_ref(), &k).await?;
            let write = (k, serde_json::to_string(&rule)?, Expect::Any);
            let revision = commit_audited(source.as_ref(), vec![write], &[], vec![change]).await?;
            println!("{}", json!({ "rule": rule, "revision": revision }));
        }
        AlertCmd::Apply { path, prune } => {
            let rules = rules_at(std::path::Path::new(&path), &cfg.queue.family)?;
            if rules.len() > 100 {
                bail!(
                    "{} rules: at most 100 in one apply (one etcd transaction)",
                    rules.len()
                );
            }
            let stored: Vec<(String, String, i64)> = source
                .load()
                .await?
                .entries
                .into_iter()
                .filter(|(k, _, _)| k.starts_with("alerts/"))
                .collect();
            let (mut writes, mut unchanged, mut applied) = (Vec::new(), Vec::new(), Vec::new());
            let mut changes = Vec::new();
            for rule in &rules {
                let k = key(&rule.name);
                let json = serde_json::to_string(rule)?;
                let change = Change::new(AuditAction::AlertPut, &rule.name).after(rule.redacted());
                match stored.iter().find(|(sk, _, _)| *sk == k) {
                    Some((_, v, _))
                        if serde_json::from_str::<AlertRule>(v).ok().as_ref() == Some(rule) =>
                    {
                        unchanged.push(rule.name.clone());
                    }
                    Some((_, v, rev)) => {
                        writes.push((k, json, Expect::Revision(*rev)));
                        applied.push(rule.name.clone());
                        changes.push(Change {
                            before: redacted_rule(v),
                            ..change
                        });
                    }
                    None => {
                        writes.push((k, json, Expect::Absent));
                        applied.push(rule.name.clone());
                        changes.push(change);
                    }
                }
            }
            // Pruned in the same transaction: the rules are all or nothing.
            let mut deleted = Vec::new();
            let mut deletes = Vec::new();
            if prune {
                for (k, v, _) in &stored {
                    let name = k.trim_start_matches("alerts/");
                    if !rules.iter().any(|r| r.name == name) {
                        deletes.push(k.clone());
                        deleted.push(name.to_owned());
                        let mut c = Change::new(AuditAction::AlertDelete, name);
                        c.before = redacted_rule(v);
                        changes.push(c);
                    }
                }
            }
            // One transaction: etcd takes 128 operations in one by default (one
            // more goes to the audit entry).
            if writes.len() + deletes.len() > 127 {
                bail!(
                    "{} rules to write and {} to prune: at most 127 in one apply (one etcd transaction)",
                    writes.len(),
                    deletes.len()
                );
            }
            let revision = if writes.is_empty() && deletes.is_empty() {
                None
            } else {
                match commit_audited(source.as_ref(), writes, &deletes, changes).await? {
                    Some(r) => Some(r),
                    None => {
                        bail!("the rules changed in etcd meanwhile: nothing applied; run it again")
                    }
                }
            };
            println!(
                "{}",
                json!({ "applied": applied, "unchanged": unchanged, "deleted": deleted, "revision": revision })
            );
        }
        AlertCmd::Delete { name } => {
            let k = key(&name);
            let Some(before) = before_rule(source.as_ref(), &k).await? else {
                bail!("alert rule {name:?} not found");
            };
            let mut change = Change::new(AuditAction::AlertDelete, &name);
            change.before = Some(before);
            let revision = commit_audited(
                source.as_ref(),
                Vec::new(),
                std::slice::from_ref(&k),
                vec![change],
            )
            .await?;
            println!("{}", json!({ "deleted": name, "revision": revision }));
        }
    }
    Ok(())
}

/// A stored rule as its audit entry shows it (sinks' secrets redacted; an
/// unreadable value as the text it is).
fn redacted_rule(stored: &str) -> Option<serde_json::Value> {
    match serde_json::from_str::<AlertRule>(stored) {
        Ok(r) => serde_json::to_value(r.redacted()).ok(),
        Err(_) => Some(stored.into()),
    }
}

/// The rule at `k` before a change, for its audit entry (`None`: no rule there).
async fn before_rule(
    source: &dyn chime_shared::config::source::ConfigSource,
    k: &str,
) -> Result<Option<serde_json::Value>> {
    Ok(source.get(k).await?.and_then(|(v, _)| redacted_rule(&v)))
}
