//! `chime apply` and `chime export`: the deployment's configuration as files.
//! `export` prints every job (workflows included), live setting and alert rule in
//! etcd as YAML documents; `apply -f FILE|DIR` makes etcd hold what the files say:
//! every object is checked first the way the coordinators check it (a bad one is
//! refused naming its file, document and field, and nothing is written), objects
//! already stored as given are left alone (a second apply writes nothing), and the
//! rest are written in etcd transactions of up to 100, each only if its keys did not
//! change meanwhile. `--dry-run` prints the plan and writes nothing. `--set NAME`
//! remembers which objects this set applied (under `applied/<NAME>`), and with
//! `--prune` deletes those of the set's last apply that the files no longer have;
//! objects created otherwise are never pruned. A prune that would leave a workflow
//! (in the files, or stored and left alone) running a job it deletes is refused,
//! and the set's record keeps listing what is being pruned until it is gone, so an
//! apply stopped midway prunes the rest the next time.
//!
//! A document is a map with a `kind`:
//! - `job` (or `workflow`): the job's JSON fields (`docs/http-api.md`), stored at
//!   `jobs/<name>`;
//! - `setting`: `key` and `value` (`queues/default/count: 16`);
//! - `alert`: an alert rule (`alerts/<name>`).
//!
//! Like `chime alert apply`, changes made here go straight to etcd (the leader
//! watches it); each transaction carries the audit entries of its changes (who:
//! `cli:<user>@<host>`), which the leader moves into the audit log
//! (`chime_coordinator::audit`'s inbox).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use chime_coordinator::alerts::rule::AlertRule;
use chime_coordinator::audit::Change;
use chime_coordinator::model::{AuditAction, JobSpec};
use chime_coordinator::store::JobStore;
use chime_shared::config as live;
use chime_shared::config::source::Expect;
use serde_json::{Value, json};

use crate::StoreArgs;

/// `chime apply` arguments.
#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// A YAML (`.yaml`, `.yml`; several documents per file) or JSON (`.json`: one
    /// object or an array) file, or a directory of such files (in name order).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Print what would change (with each changed field) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// The name of this set of objects: what it applied is remembered, for
    /// `--prune`.
    #[arg(long)]
    set: Option<String>,
    /// Delete the objects the set's last apply wrote that the files no longer
    /// have (needs `--set`).
    #[arg(long, requires = "set")]
    prune: bool,
    /// The cluster's floor for a schedule's period (`coordinator.min_period_ms`).
    #[arg(long, default_value_t = 1_000)]
    min_period_ms: u64,
}

/// `chime export` arguments.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    store: StoreArgs,
}

/// One object of the configuration.
#[derive(Debug, Clone, PartialEq)]
enum Object {
    Job(Box<JobSpec>),
    Setting { key: String, value: String },
    Alert(Box<AlertRule>),
}

impl Object {
    /// Its key in etcd, relative to the prefix.
    fn key(&self) -> String {
        match self {
            Object::Job(j) => format!("jobs/{}", j.name),
            Object::Setting { key, .. } => key.clone(),
            Object::Alert(r) => chime_coordinator::alerts::rule::key(&r.name),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Object::Job(j) if j.workflow.is_some() => "workflow",
            Object::Job(_) => "job",
            Object::Setting { .. } => "setting",
            Object::Alert(_) => "alert",
        }
    }

    /// What etcd holds for it.
    fn stored_text(&self) -> Result<String> {
        Ok(match self {
            Object::Job(j) => serde_json::to_string(j)?,
            Object::Setting { value, .. } => value.clone(),
            Object::Alert(r) => serde_json::to_string(r)?,
        })
    }

    /// Its document, as `export` prints it and `apply` reads it.
    fn document(&self) -> Result<Value> {
        let mut v = match self {
            Object::Job(j) => {
                let mut v = serde_json::to_value(j)?;
                // Set by the store; not configuration.
                if let Value::Object(m) = &mut v {
                    m.remove("created_at_ms");
                }
                v
            }
            Object::Setting { key, value } => json!({ "key": key, "value": value }),
            Object::Alert(r) => serde_json::to_value(r)?,
        };
        if let Value::Object(m) = &mut v {
            m.insert("kind".into(), json!(self.kind()));
        }
        Ok(v)
    }
}

/// The documents of one file.
fn documents(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    if yaml {
        let mut out = Vec::new();
        for (i, doc) in yaml_serde::Deserializer::from_str(&text).enumerate() {
            let v: Value = serde_path_to_error::deserialize(doc).map_err(|e| {
                anyhow::anyhow!(
                    "{} (document {i}): invalid {}: {}",
                    path.display(),
                    e.path(),
                    e.inner()
                )
            })?;
            if !v.is_null() {
                out.push(v);
            }
        }
        return Ok(out);
    }
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    Ok(match v {
        Value::Array(items) => items,
        one => vec![one],
    })
}

/// One document as an object, checked; errors name the field.
fn object(mut doc: Value, family: &str) -> Result<Object> {
    let Value::Object(m) = &mut doc else {
        bail!("invalid document: not a map");
    };
    let kind = m
        .remove("kind")
        .and_then(|k| k.as_str().map(str::to_owned))
        .context("invalid kind: missing (job, workflow, setting or alert)")?;
    Ok(match kind.as_str() {
        "job" | "workflow" => {
            let spec: JobSpec = serde_path_to_error::deserialize(doc)
                .map_err(|e| anyhow::anyhow!("invalid {}: {}", e.path(), e.inner()))?;
            spec.validate()?;
            if kind == "workflow" && spec.workflow.is_none() {
                bail!("invalid workflow: a document of kind workflow has no workflow field");
            }
            Object::Job(Box::new(spec))
        }
        "setting" => {
            let field = |name: &str| -> Result<String> {
                match m.get(name) {
                    Some(Value::String(s)) => Ok(s.trim().to_owned()),
                    Some(Value::Number(n)) => Ok(n.to_string()),
                    Some(Value::Bool(b)) => Ok(b.to_string()),
                    _ => bail!("invalid {name}: missing or not a string"),
                }
            };
            let (key, value) = (field("key")?, field("value")?);
            if let Some(extra) = m.keys().find(|k| *k != "key" && *k != "value") {
                bail!("invalid {extra}: unknown field of a setting (key, value)");
            }
            live::parse(&key, Some(&value)).map_err(|r| anyhow::anyhow!("invalid {r}"))?;
            Object::Setting { key, value }
        }
        "alert" => Object::Alert(Box::new(AlertRule::parse(
            doc.to_string().as_bytes(),
            family,
        )?)),
        other => bail!("invalid kind: {other:?} (job, workflow, setting or alert)"),
    })
}

/// Every object of `path` (a file or a directory's files), checked; a key given
/// twice is refused.
fn objects_at(path: &Path, family: &str) -> Result<Vec<Object>> {
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            let p = e?.path();
            if p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"))
            {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut out: Vec<Object> = Vec::new();
    for f in files {
        for (i, doc) in documents(&f)?.into_iter().enumerate() {
            let o =
                object(doc, family).with_context(|| format!("{} (document {i})", f.display()))?;
            if out.iter().any(|x| x.key() == o.key()) {
                bail!("{} (document {i}): {} is given twice", f.display(), o.key());
            }
            out.push(o);
        }
    }
    Ok(out)
}

/// The objects etcd holds (unreadable ones skipped), with their revisions.
fn stored_objects(entries: &[(String, String, i64)], family: &str) -> Vec<(Object, i64)> {
    entries
        .iter()
        .filter_map(|(k, v, rev)| {
            let o = if k.starts_with("jobs/") {
                Object::Job(Box::new(serde_json::from_str(v).ok()?))
            } else if k.starts_with("alerts/") {
                Object::Alert(Box::new(AlertRule::parse(v.as_bytes(), family).ok()?))
            } else if live::is_internal(k) || live::parse(k, Some(v)).is_err() {
                return None;
            } else {
                Object::Setting {
                    key: k.clone(),
                    value: v.clone(),
                }
            };
            Some((o, *rev))
        })
        .collect()
}

/// `a` and `b` flattened to dotted paths: the paths whose values differ.
fn changed_fields(a: &Value, b: &Value) -> BTreeMap<String, Value> {
    fn flat(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flat(&p, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.clone());
            }
        }
    }
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    flat("", a, &mut fa);
    flat("", b, &mut fb);
    let keys: BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
    keys.into_iter()
        .filter(|k| fa.get(*k) != fb.get(*k))
        .map(|k| {
            (
                k.clone(),
                json!({ "from": fa.get(k).cloned().unwrap_or(Value::Null), "to": fb.get(k).cloned().unwrap_or(Value::Null) }),
            )
        })
        .collect()
}

/// The job `name` as applied here, else as stored.
fn job_named<'a>(
    wanted: &'a [Object],
    stored: &'a [(Object, i64)],
    name: &str,
) -> Option<&'a JobSpec> {
    wanted
        .iter()
        .chain(stored.iter().map(|(o, _)| o))
        .find_map(|o| match o {
            Object::Job(j) if j.name == name => Some(j.as_ref()),
            _ => None,
        })
}

/// Runs `chime export`.
pub async fn export(args: ExportArgs) -> Result<()> {
    let (cfg, source) = crate::cmd_config::etcd_source(&args.store).await?;
    let snap = source.load().await?;
    let mut objects = stored_objects(&snap.entries, &cfg.queue.family);
    objects.sort_by_key(|(o, _)| (o.kind() != "setting", o.kind() == "alert", o.key()));
    for (o, _) in objects {
        print!("---\n{}", yaml_serde::to_string(&o.document()?)?);
    }
    Ok(())
}

/// Runs `chime apply`.
pub async fn apply(args: ApplyArgs) -> Result<()> {
    if let Some(set) = &args.set {
        chime_shared::limits::check_handler("set", set)?;
    }
    let (cfg, source) = crate::cmd_config::etcd_source(&args.store).await?;
    let family = cfg.queue.family.clone();
    let wanted = objects_at(&args.file, &family)?;
    let snap = source.load().await?;
    let stored = stored_objects(&snap.entries, &family);
    let now = chime_shared::clock::system_now_ms();
    // The checks the coordinators' job store makes that need the other jobs or the
    // cluster's floor: a node's job exists (stored or applied here) and is no
    // workflow; a schedule is no more frequent than the floor.
    let jobs = JobStore::new(source.clone()).with_min_period_ms(args.min_period_ms);
    let set_key = args.set.as_ref().map(|s| format!("applied/{s}"));
    let previous: BTreeSet<String> = match &set_key {
        Some(k) => snap
            .entries
            .iter()
            .find(|(sk, _, _)| sk == k)
            .and_then(|(_, v, _)| serde_json::from_str(v).ok())
            .unwrap_or_default(),
        None => BTreeSet::new(),
    };
    let now_keys: BTreeSet<String> = wanted.iter().map(Object::key).collect();
    // What `--prune` deletes: the set's last apply wrote it, the files no longer
    // have it, and it is still there.
    let pruned: BTreeSet<String> = match args.prune {
        false => BTreeSet::new(),
        true => previous
            .difference(&now_keys)
            .filter(|k| stored.iter().any(|(s, _)| s.key() == **k))
            .cloned()
            .collect(),
    };
    // The stored objects that remain after this apply (a node's job must be one
    // of them or applied here).
    let kept: Vec<(Object, i64)> = stored
        .iter()
        .filter(|(o, _)| !pruned.contains(&o.key()))
        .cloned()
        .collect();
    // A stored workflow the files leave alone must not lose a job it runs.
    for (o, _) in &kept {
        let Object::Job(w) = o else { continue };
        if now_keys.contains(&o.key()) {
            continue;
        }
        for n in w.workflow.iter().flat_map(|w| w.nodes.iter()) {
            if !n.job.is_empty() && job_named(&wanted, &kept, &n.job).is_none() {
                bail!(
                    "--prune would delete job {:?}, which workflow {:?} (stored, not in the files) runs; change or remove the workflow first",
                    n.job,
                    w.name
                );
            }
        }
    }
    for o in &wanted {
        let Object::Job(j) = o else { continue };
        let at = || format!("{} {}", o.kind(), j.name);
        let existing = stored.iter().find(|(s, _)| s.key() == o.key());
        let schedule_changed =
            !matches!(existing, Some((Object::Job(s), _)) if s.schedule == j.schedule);
        if schedule_changed {
            jobs.check_floor(j, now).with_context(at)?;
        }
        for (i, n) in j.workflow.iter().flat_map(|w| w.nodes.iter()).enumerate() {
            if n.job.is_empty() {
                continue;
            }
            match job_named(&wanted, &kept, &n.job) {
                None => bail!(
                    "{}: invalid workflow.nodes[{i}].job: no job is named {:?}",
                    at(),
                    n.job
                ),
                Some(t) if t.workflow.is_some() => bail!(
                    "{}: invalid workflow.nodes[{i}].job: {:?} is a workflow; workflows do not nest",
                    at(),
                    n.job
                ),
                Some(_) => {}
            }
        }
    }
    // The plan: what to create, update, leave, delete.
    let (mut writes, mut changes, mut unchanged) = (Vec::new(), Vec::new(), Vec::new());
    for o in &wanted {
        let mut o = o.clone();
        let existing = stored.iter().find(|(s, _)| s.key() == o.key());
        if let (Object::Job(j), Some((Object::Job(s), _))) = (&mut o, existing) {
            j.created_at_ms = s.created_at_ms;
        } else if let Object::Job(j) = &mut o {
            j.created_at_ms = now;
        }
        match existing {
            Some((s, _)) if *s == o => unchanged.push(json!({ "kind": o.kind(), "key": o.key() })),
            Some((s, rev)) => {
                let fields = changed_fields(&s.document()?, &o.document()?);
                eprintln!("~ {} {}", o.kind(), o.key());
                for (f, d) in &fields {
                    eprintln!("    {f}: {} → {}", d["from"], d["to"]);
                }
                changes.push(
                    json!({ "op": "update", "kind": o.kind(), "key": o.key(), "fields": fields }),
                );
                let audit = audit_change(Some(s), Some(&o));
                writes.push(((o.key(), o.stored_text()?, Expect::Revision(*rev)), audit));
            }
            None => {
                eprintln!("+ {} {}", o.kind(), o.key());
                changes.push(json!({ "op": "create", "kind": o.kind(), "key": o.key() }));
                let audit = audit_change(None, Some(&o));
                writes.push(((o.key(), o.stored_text()?, Expect::Absent), audit));
            }
        }
    }
    for k in &pruned {
        if let Some((o, _)) = stored.iter().find(|(s, _)| s.key() == *k) {
            eprintln!("- {} {}", o.kind(), k);
            changes.push(json!({ "op": "delete", "kind": o.kind(), "key": k }));
        }
    }
    let mut revision = None;
    if !args.dry_run {
        // The set's record goes with the last batch, and still lists what is
        // about to be pruned: an apply that fails, or stops, before every delete
        // is done leaves those keys in the record, so the next prune deletes them.
        // Once they are gone, the record lists the files' keys alone.
        let mut record = match &set_key {
            Some(k) => {
                let rev = snap
                    .entries
                    .iter()
                    .find(|(sk, _, _)| sk == k)
                    .map(|(_, _, rev)| *rev);
                Some((k.clone(), rev))
            }
            None => None,
        };
        let listed: BTreeSet<String> = now_keys.union(&pruned).cloned().collect();
        let record_in_batch = match &record {
            Some((k, rev)) if previous != listed => {
                let expect = rev.map_or(Expect::Absent, Expect::Revision);
                writes.push(((k.clone(), serde_json::to_string(&listed)?, expect), None));
                true
            }
            _ => false,
        };
        // Each batch is one transaction with the audit entries of its changes.
        let mut done = 0;
        for batch in batches(writes.len(), |i| batch_bytes(&writes[i])) {
            let (puts, audits): (Vec<_>, Vec<_>) = writes[batch.clone()].iter().cloned().unzip();
            let audits = audits.into_iter().flatten().collect();
            match crate::cmd_config::commit_audited(source.as_ref(), puts, &[], audits).await? {
                Some(r) => revision = Some(r),
                None => bail!(
                    "an object changed in etcd meanwhile: {done} of {} writes applied before it; run it again",
                    writes.len()
                ),
            }
            done += batch.len();
        }
        if record_in_batch && let Some((_, rev)) = &mut record {
            // The record was in the last transaction: that is its revision now.
            *rev = revision;
        }
        for k in &pruned {
            let audit = stored
                .iter()
                .find(|(s, _)| s.key() == *k)
                .and_then(|(s, _)| audit_change(Some(s), None));
            let deleted = crate::cmd_config::commit_audited(
                source.as_ref(),
                Vec::new(),
                std::slice::from_ref(k),
                audit.into_iter().collect(),
            )
            .await?;
            revision = deleted.or(revision);
        }
        if let Some((k, rev)) = record
            && !pruned.is_empty()
        {
            let expect = rev.map_or(Expect::Absent, Expect::Revision);
            match source
                .put_if_all(&[(k, serde_json::to_string(&now_keys)?, expect)])
                .await?
            {
                Some(r) => revision = Some(r),
                None => bail!(
                    "the set's record changed in etcd meanwhile (another apply of it?); run it again"
                ),
            }
        }
    }
    println!(
        "{}",
        json!({
            "dry_run": args.dry_run,
            "changes": changes,
            "unchanged": unchanged.len(),
            "revision": revision,
        })
    );
    Ok(())
}

/// Most objects in one transaction: with the audit entry, 61 operations, under
/// etcd's 128 a transaction by default.
const BATCH_OBJECTS: usize = 60;
/// Most bytes of values (objects and their audit entries) in one transaction:
/// etcd takes requests of up to 1.5 MiB by default.
const BATCH_BYTES: usize = 1 << 20;

/// Splits `n` writes into consecutive batches of at most [`BATCH_OBJECTS`] and
/// about [`BATCH_BYTES`] (`bytes(i)` is write `i`'s size; a write bigger than that
/// goes alone).
fn batches(n: usize, bytes: impl Fn(usize) -> usize) -> Vec<std::ops::Range<usize>> {
    let (mut out, mut start, mut size) = (Vec::new(), 0, 0);
    for i in 0..n {
        let b = bytes(i);
        if i > start && (i - start == BATCH_OBJECTS || size + b > BATCH_BYTES) {
            out.push(start..i);
            (start, size) = (i, 0);
        }
        size += b;
    }
    if start < n {
        out.push(start..n);
    }
    out
}

/// The bytes a planned write puts in its transaction: key, value and audit change.
fn batch_bytes(w: &((String, String, Expect), Option<Change>)) -> usize {
    let ((k, v, _), audit) = w;
    let json_len = |v: &Option<Value>| v.as_ref().map_or(0, |v| v.to_string().len());
    k.len()
        + v.len()
        + audit
            .as_ref()
            .map_or(0, |c| json_len(&c.before) + json_len(&c.after))
}

/// An object as its audit entry shows it: a job's definition, a setting's value,
/// an alert rule with its sinks' secrets redacted.
fn audit_value(o: &Object) -> Value {
    match o {
        Object::Job(j) => serde_json::to_value(j).unwrap_or(Value::Null),
        Object::Setting { value, .. } => Value::String(value.clone()),
        Object::Alert(r) => serde_json::to_value(r.redacted()).unwrap_or(Value::Null),
    }
}

/// The audit change of replacing `before` by `after` (either may be absent: a
/// create, a delete); `None` when both are.
fn audit_change(before: Option<&Object>, after: Option<&Object>) -> Option<Change> {
    let o = after.or(before)?;
    let (action, target) = match (o, after.is_some(), before.is_some()) {
        (Object::Job(j), true, false) => (AuditAction::JobCreate, j.name.clone()),
        (Object::Job(j), true, true) => (AuditAction::JobUpdate, j.name.clone()),
        (Object::Job(j), false, _) => (AuditAction::JobDelete, j.name.clone()),
        (Object::Setting { key, .. }, true, _) => (AuditAction::ConfigSet, key.clone()),
        (Object::Setting { key, .. }, false, _) => (AuditAction::ConfigDelete, key.clone()),
        (Object::Alert(r), true, _) => (AuditAction::AlertPut, r.name.clone()),
        (Object::Alert(r), false, _) => (AuditAction::AlertDelete, r.name.clone()),
    };
    let mut c = Change::new(action, target);
    c.before = before.map(audit_value);
    c.after = after.map(audit_value);
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_at_most_sixty_objects_and_about_a_mebibyte() {
        assert_eq!(batches(0, |_| 1), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(batches(130, |_| 10), [0..60, 60..120, 120..130]);
        // Big objects: split by size; one bigger than the limit goes alone.
        let big = BATCH_BYTES / 3 + 1;
        assert_eq!(batches(5, |_| big), [0..2, 2..4, 4..5]);
        assert_eq!(
            batches(3, |i| if i == 1 { 2 * BATCH_BYTES } else { 1 }),
            [0..1, 1..2, 2..3]
        );
    }

    #[test]
    fn audit_changes_name_the_action_and_redact_alert_sinks() {
        let setting = |v: &str| Object::Setting {
            key: "queues/default/count".into(),
            value: v.into(),
        };
        let c = audit_change(Some(&setting("8")), Some(&setting("16"))).unwrap();
        assert_eq!(c.action, AuditAction::ConfigSet);
        assert_eq!((c.before, c.after), (Some(json!("8")), Some(json!("16"))));
        let c = audit_change(Some(&setting("8")), None).unwrap();
        assert_eq!(c.action, AuditAction::ConfigDelete);
        assert!(audit_change(None, None).is_none());
        let rule = AlertRule::parse(
            br#"{"name": "lag", "condition": {"kind": "queue_lag", "above_ms": 2000},
                 "sinks": [{"kind": "webhook", "url": "https://hooks.example.com/in?token=s3cret",
                            "secret": "s3cret-too"}]}"#,
            "default",
        )
        .unwrap();
        let c = audit_change(None, Some(&Object::Alert(Box::new(rule)))).unwrap();
        assert_eq!(
            (c.action, c.target.as_str()),
            (AuditAction::AlertPut, "lag")
        );
        assert!(!c.after.unwrap().to_string().contains("s3cret"));
    }
}
