//! The resize mover of the Redis store: moves items that a new layout places in
//! another queue, and finds when a queue is clean.
//!
//! A worker holding a queue's lease calls [`RedisStore::migrate_step`] between pops.
//! One step reads a page of the queue (pending, in-flight, dead or waiting items, in
//! that order) and moves the misplaced pending, dead and waiting ones in four
//! idempotent steps:
//!
//! 1. `MV_TAKE` on the source (fenced by the lease and the epoch): the items leave
//!    `due`/`dead`/`park` for `moving`, recording a random move token and their target. No
//!    consumer can pop them now; their records stay in the source.
//! 2. `MV_IMPORT` on each target: stores them as they were (pending with the same
//!    due score, dead, or waiting for a handler) and leaves a tombstone for the token, so importing twice
//!    does nothing.
//! 3. `MV_FINISH` on the source: forgets the moved items.
//! 4. `MV_UNMARK` on each target: drops the tombstone.
//!
//! A mover that dies mid-way leaves items in `moving`; the next pass on that queue
//! finishes their moves first (`MV_PENDING`), importing to the recorded target, so an
//! item lands exactly once. In-flight items are never moved: a misplaced in-flight
//! item keeps its queue from being clean until it is settled or comes back to
//! pending (and is then moved). A pass that saw nothing misplaced marks the queue
//! clean for the epoch (`MV_CLEAN`) unless items went back to pending meanwhile (the
//! `back` counter); when every queue is clean the draining layouts retire.

use std::collections::{BTreeMap, HashMap, HashSet};

use ::redis::Value;

use super::layout::Layout;
use super::redis_store::{
    MV_CLEAN, MV_FINISH, MV_IMPORT, MV_PENDING, MV_RETARGET, MV_SCAN, MV_TAKE, MV_UNMARK,
    RedisStore, array, int, stale_epoch, text,
};
use super::{DelayStore, Lease, MigrateStep, queue_for};
use crate::error::{Error, Result};
use crate::telemetry as m;

/// Which set of a queue a pass is reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Due,
    Run,
    Dead,
    Park,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Due => "due",
            Phase::Run => "run",
            Phase::Dead => "dead",
            Phase::Park => "park",
        }
    }
}

/// The item id inside a park member (`handler \x01 due \x01 id`); other sets'
/// members are ids already.
fn id_of(phase: Phase, member: &str) -> String {
    match phase {
        Phase::Park => member
            .splitn(3, super::codec::SEP)
            .nth(2)
            .unwrap_or_default()
            .to_owned(),
        _ => member.to_owned(),
    }
}

/// One queue's pass in progress.
#[derive(Debug, Clone)]
struct Pass {
    epoch: u64,
    phase: Phase,
    cursor: String,
    /// Something misplaced could not be moved (in flight, or popped meanwhile).
    blocked: bool,
    /// The queue's `back` counter when the pass began.
    back: Option<i64>,
}

impl Pass {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            phase: Phase::Due,
            cursor: String::new(),
            blocked: false,
            back: None,
        }
    }
}

/// Passes in progress and queues known clean, for the current epoch.
#[derive(Debug, Default)]
pub(crate) struct Passes {
    passes: HashMap<u32, Pass>,
    clean: HashSet<u32>,
    clean_epoch: u64,
    /// Set by [`RedisStore::die_after_next_landing`]: the next move stops as a mover
    /// killed between its imports and its finish would.
    die_after_landing: bool,
}

/// An item record as `MV_TAKE` / `MV_PENDING` return it: id, score, kind, body,
/// attempts, last error, merge class.
type Record = [Value; 7];

impl RedisStore {
    fn passes(&self) -> std::sync::MutexGuard<'_, Passes> {
        self.passes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fault injection for tests: the next move lands its items at their new home
    /// and then fails before the source forgets them, leaving what a mover killed at
    /// that point leaves (the items in the source's `moving` and imported at the
    /// target).
    #[doc(hidden)]
    pub fn die_after_next_landing(&self) {
        self.passes().die_after_landing = true;
    }

    fn note_clean(&self, epoch: u64, queue: u32) {
        let mut p = self.passes();
        if p.clean_epoch != epoch {
            p.clean.clear();
            p.clean_epoch = epoch;
        }
        p.clean.insert(queue);
        p.passes.remove(&queue);
    }

    pub(super) fn migration_wanted(&self, queue: u32) -> bool {
        let layout = self.current_layout();
        if !layout.in_transition() {
            return false;
        }
        let p = self.passes();
        !(p.clean_epoch == layout.epoch && p.clean.contains(&queue))
    }

    pub(super) async fn migrate_step(&self, lease: &Lease, max_items: u32) -> Result<MigrateStep> {
        let layout = self.current_layout();
        let q = lease.queue;
        if !self.migration_wanted(q) {
            return Ok(MigrateStep {
                moved: 0,
                clean: true,
            });
        }
        let mut pass = {
            let p = self.passes();
            p.passes
                .get(&q)
                .filter(|p| p.epoch == layout.epoch)
                .cloned()
        }
        .unwrap_or_else(|| Pass::new(layout.epoch));
        let mut moved = 0;
        if pass.phase == Phase::Due && pass.cursor.is_empty() {
            moved += self.recover(lease, &layout, max_items).await?;
        }
        let limit = max_items.max(1);
        let args = vec![
            pass.phase.name().as_bytes().to_vec(),
            pass.cursor.clone().into_bytes(),
            limit.to_string().into_bytes(),
        ];
        let parts = array(self.run(&MV_SCAN, q, args).await?, "mv_scan")?;
        if parts.len() < 3 || (parts.len() - 3) % 3 != 0 {
            return Err(Error::Corrupt("mv_scan: unexpected answer".into()));
        }
        let tail = &parts[parts.len() - 3..];
        let (back, moving, clean_epoch) = (
            int(&tail[0], "mv_scan")?,
            int(&tail[1], "mv_scan")?,
            int(&tail[2], "mv_scan")? as u64,
        );
        if clean_epoch >= layout.epoch {
            // Another worker found it clean.
            self.note_clean(layout.epoch, q);
            return Ok(MigrateStep { moved, clean: true });
        }
        pass.back.get_or_insert(back);
        let entries = &parts[..parts.len() - 3];
        let n = entries.len() / 3;
        let mut misplaced: Vec<(String, u32)> = Vec::new();
        let mut last_kept = None;
        for e in entries.chunks(3) {
            let member = text(&e[0]).unwrap_or_default();
            let key = text(&e[1]).unwrap_or_default();
            let home = queue_for(&key, layout.count);
            if key.is_empty() || home == q {
                last_kept = Some(member);
            } else if pass.phase == Phase::Run {
                pass.blocked = true;
                last_kept = Some(member);
            } else {
                misplaced.push((id_of(pass.phase, &member), home));
            }
        }
        if !misplaced.is_empty() {
            let want = misplaced.len();
            let done = self.move_items(lease, &layout, &misplaced).await?;
            moved += done;
            if (done as usize) < want {
                pass.blocked = true;
            }
        }
        if let Some(c) = last_kept {
            pass.cursor = c;
        }
        let mut clean = false;
        if n < limit as usize {
            // End of this set: next set, or the end of the pass.
            match pass.phase {
                Phase::Due => pass.phase = Phase::Run,
                Phase::Run => pass.phase = Phase::Dead,
                Phase::Dead => pass.phase = Phase::Park,
                Phase::Park => {
                    if !pass.blocked && moving == 0 {
                        let args = vec![
                            layout.epoch.to_string().into_bytes(),
                            pass.back.unwrap_or(back).to_string().into_bytes(),
                        ];
                        clean = int(&self.run(&MV_CLEAN, q, args).await?, "mv_clean")? == 1;
                    }
                    pass = Pass::new(layout.epoch);
                }
            }
            if !clean {
                pass.cursor.clear();
            }
        }
        if clean {
            self.note_clean(layout.epoch, q);
            tracing::info!(queue = q, epoch = layout.epoch, "queue clean after resize");
            self.maybe_retire(&layout).await?;
        } else {
            self.passes().passes.insert(q, pass);
        }
        Ok(MigrateStep { moved, clean })
    }

    /// Moves `(id, target)` items out of the leased queue; answers how many moved.
    async fn move_items(
        &self,
        lease: &Lease,
        layout: &Layout,
        items: &[(String, u32)],
    ) -> Result<u64> {
        let token = format!("{:016x}", fastrand::u64(..));
        let mut args = vec![
            lease.token.clone().into_bytes(),
            layout.epoch.to_string().into_bytes(),
            token.clone().into_bytes(),
        ];
        for (id, target) in items {
            args.push(id.clone().into_bytes());
            args.push(target.to_string().into_bytes());
        }
        let parts = array(self.run(&MV_TAKE, lease.queue, args).await?, "mv_take")?;
        if parts.len() == 1 && text(&parts[0]).as_deref() == Some("STALE_LEASE") {
            return Err(Error::StaleLease { queue: lease.queue });
        }
        stale_epoch(&parts)?;
        if parts.len() % 7 != 0 {
            return Err(Error::Corrupt("mv_take: unexpected answer".into()));
        }
        let targets: HashMap<&str, u32> = items.iter().map(|(i, t)| (i.as_str(), *t)).collect();
        let mut by_target: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
        for r in parts.chunks(7) {
            let id = text(&r[0]).unwrap_or_default();
            let target = targets.get(id.as_str()).copied().unwrap_or(0);
            by_target
                .entry(target)
                .or_default()
                .push(std::array::from_fn(|i| r[i].clone()));
        }
        self.land(lease.queue, layout, &token, by_target).await
    }

    /// Imports taken records into their targets, then forgets them at the source.
    async fn land(
        &self,
        source: u32,
        layout: &Layout,
        token: &str,
        by_target: BTreeMap<u32, Vec<Record>>,
    ) -> Result<u64> {
        let mut landed: Vec<String> = Vec::new();
        let mut targets = Vec::new();
        for (target, records) in by_target {
            let ids: Vec<String> = records
                .iter()
                .map(|r| text(&r[0]).unwrap_or_default())
                .collect();
            let mut target = target;
            // A target sealed by a newer layout refused the import (and never got
            // it): point the move at the item's home under the newest layout.
            for _ in 0..3 {
                match self
                    .import(
                        target,
                        layout.epoch.max(self.current_layout().epoch),
                        token,
                        &records,
                    )
                    .await
                {
                    Ok(dropped) => {
                        if dropped > 0 {
                            tracing::warn!(
                                queue = target,
                                dropped,
                                "moved items already present at their new home; kept the one there"
                            );
                        }
                        landed.extend(ids.iter().cloned());
                        targets.push(target);
                        break;
                    }
                    Err(Error::StaleLayout { epoch }) => {
                        let fresh = self.refresh_layout().await?;
                        if fresh.epoch < epoch {
                            return Err(Error::StaleLayout { epoch });
                        }
                        // Re-target per item (they may now have different homes); the
                        // simple case, one new home for all, is the common one.
                        let key_of = |r: &Record| {
                            super::redis_store::bytes(&r[3])
                                .and_then(|b| super::codec::decode_body(b).ok())
                                .map(|b| b.key)
                                .unwrap_or_default()
                        };
                        let new_target = queue_for(&key_of(&records[0]), fresh.count);
                        if records
                            .iter()
                            .any(|r| queue_for(&key_of(r), fresh.count) != new_target)
                        {
                            // Leave them in `moving`; the next pass recovers them one
                            // target at a time.
                            break;
                        }
                        let mut args = vec![
                            token.as_bytes().to_vec(),
                            new_target.to_string().into_bytes(),
                        ];
                        args.extend(ids.iter().map(|i| i.clone().into_bytes()));
                        self.run(&MV_RETARGET, source, args).await?;
                        target = new_target;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if landed.is_empty() {
            return Ok(0);
        }
        if std::mem::take(&mut self.passes().die_after_landing) {
            return Err(Error::Unavailable(
                "mover stopped after landing (injected fault)".into(),
            ));
        }
        let mut args = vec![token.as_bytes().to_vec()];
        args.extend(landed.iter().map(|i| i.clone().into_bytes()));
        let n = int(&self.run(&MV_FINISH, source, args).await?, "mv_finish")? as u64;
        for t in targets {
            self.run(&MV_UNMARK, t, vec![token.as_bytes().to_vec()])
                .await?;
        }
        metrics::counter!(m::ITEMS_MIGRATED).increment(n);
        Ok(n)
    }

    /// `MV_IMPORT` of records into `target`; answers how many were dropped as already
    /// present.
    async fn import(
        &self,
        target: u32,
        epoch: u64,
        token: &str,
        records: &[Record],
    ) -> Result<i64> {
        let mut args = vec![epoch.to_string().into_bytes(), token.as_bytes().to_vec()];
        for r in records {
            for v in r {
                args.push(match v {
                    Value::Int(i) => i.to_string().into_bytes(),
                    other => super::redis_store::bytes(other)
                        .map(<[u8]>::to_vec)
                        .unwrap_or_default(),
                });
            }
        }
        let parts = array(self.run(&MV_IMPORT, target, args).await?, "mv_import")?;
        stale_epoch(&parts)?;
        match text(&parts[0]).as_deref() {
            Some("DONE") => Ok(0),
            Some("OK") => int(&parts[1], "mv_import"),
            other => Err(Error::Corrupt(format!("mv_import answered {other:?}"))),
        }
    }

    /// Finishes moves a dead mover left in the leased queue.
    async fn recover(&self, lease: &Lease, layout: &Layout, max_items: u32) -> Result<u64> {
        let args = vec![max_items.max(1).to_string().into_bytes()];
        let parts = array(
            self.run(&MV_PENDING, lease.queue, args).await?,
            "mv_pending",
        )?;
        if parts.is_empty() {
            return Ok(0);
        }
        // Group by (token, target) from each item's mvinfo "token|target|kind".
        let mut groups: BTreeMap<(String, u32), Vec<Record>> = BTreeMap::new();
        for r in parts.chunks(8) {
            let info = text(&r[7]).unwrap_or_default();
            let mut it = info.split('|');
            let (Some(token), Some(target)) = (it.next(), it.next().and_then(|t| t.parse().ok()))
            else {
                continue;
            };
            groups
                .entry((token.to_owned(), target))
                .or_default()
                .push(std::array::from_fn(|i| r[i].clone()));
        }
        let mut moved = 0;
        for ((token, target), records) in groups {
            tracing::info!(
                queue = lease.queue,
                target,
                items = records.len(),
                "finishing an interrupted move"
            );
            let mut by_target = BTreeMap::new();
            by_target.insert(target, records);
            moved += self.land(lease.queue, layout, &token, by_target).await?;
        }
        Ok(moved)
    }

    /// Retires the draining layouts when every queue is clean for `layout.epoch`.
    async fn maybe_retire(&self, layout: &Layout) -> Result<()> {
        let mut conn = self.connection();
        for q in 0..layout.poll_count() {
            let key = format!(
                "{{{}:{}:{}}}:clean",
                self.names().prefix,
                self.names().family,
                q
            );
            let v: Option<u64> = ::redis::cmd("GET").arg(key).query_async(&mut conn).await?;
            if v.unwrap_or(0) < layout.epoch {
                return Ok(());
            }
        }
        let l = self.retire(layout.epoch).await?;
        if !l.in_transition() {
            tracing::info!(
                epoch = l.epoch,
                count = l.count,
                "resize complete: older layouts retired"
            );
        }
        Ok(())
    }
}
