//! The in-memory delay store: the embedded default of `chime dev`, and a fast store
//! for unit tests. It mirrors the Redis scripts step for step (same reaping, same
//! merge rule, same fencing) and passes the same conformance suite; time comes from
//! the injected [`Clock`].
//!
//! One `std::sync::Mutex` guards everything: every operation is short and never
//! awaits while holding it, and this store serves one process, so a finer lock would
//! buy nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::codec::{self, Body};
use super::{
    CancelOutcome, Claimed, DUE_SOON_MS, DelayStore, Delivery, DeliveryToken, EnqueueOutcome,
    ItemRef, ItemState, ItemView, Layout, Lease, MigrateStep, NewItem, Outcome, PopOptions, Popped,
    QueueStats, RescheduleOutcome, Settlement, Wake, new_lease_token, queue_for, validate_batch,
};
use crate::clock::Clock;
use crate::error::{Error, Result};

const REAP_LIMIT: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    Due(i64),
    Run(i64),
    Dead(i64),
    /// Waiting for a consumer that serves its handler, at this due score.
    Waiting(i64),
}

#[derive(Debug)]
struct Rec {
    body: Body,
    /// Deliveries so far.
    attempts: u32,
    /// Pop counter value of the latest delivery.
    seq: Option<u64>,
    class: String,
    pos: Pos,
    cancelled: bool,
    err: Option<String>,
}

#[derive(Debug, Default)]
struct Queue {
    due: BTreeSet<(i64, String)>,
    run: BTreeSet<(i64, String)>,
    dead: BTreeSet<(i64, String)>,
    /// Merge index: (merge class, pending score, id).
    mki: BTreeSet<(String, i64, String)>,
    /// Items waiting for a handler: (handler, due score, id).
    park: BTreeSet<(String, i64, String)>,
    recs: HashMap<String, Rec>,
    lease: Option<(String, i64)>,
}

impl Queue {
    /// The announcement pending items due at `due` call for: one when they would
    /// start earlier than the earliest pending now (as `announce` in the Redis
    /// store's `common.lua`).
    fn wake_for(&self, queue: usize, due: i64) -> Option<Wake> {
        self.due
            .first()
            .is_none_or(|(head, _)| due < *head)
            .then_some(Wake {
                queue: queue as u32,
                due_at_ms: due,
            })
    }

    /// Puts `id` (in no set) into the pending set at `score`.
    fn make_pending(&mut self, id: &str, score: i64) {
        let Some(rec) = self.recs.get_mut(id) else {
            return;
        };
        rec.pos = Pos::Due(score);
        self.due.insert((score, id.to_owned()));
        if !rec.class.is_empty() {
            self.mki.insert((rec.class.clone(), score, id.to_owned()));
        }
    }

    /// Takes `id` out of whichever set holds it.
    fn unlink(&mut self, id: &str) {
        let Some(rec) = self.recs.get(id) else {
            return;
        };
        match rec.pos {
            Pos::Due(s) => {
                self.due.remove(&(s, id.to_owned()));
                if !rec.class.is_empty() {
                    self.mki.remove(&(rec.class.clone(), s, id.to_owned()));
                }
            }
            Pos::Run(d) => {
                self.run.remove(&(d, id.to_owned()));
            }
            Pos::Dead(d) => {
                self.dead.remove(&(d, id.to_owned()));
            }
            Pos::Waiting(s) => {
                self.park
                    .remove(&(rec.body.handler.clone(), s, id.to_owned()));
            }
        }
    }

    /// Parks `id` (taking it out of its set) until a consumer serving its handler
    /// pops this queue.
    fn park(&mut self, id: &str) {
        self.unlink(id);
        if let Some(rec) = self.recs.get_mut(id) {
            let score = rec.body.due_at_ms;
            rec.pos = Pos::Waiting(score);
            self.park
                .insert((rec.body.handler.clone(), score, id.to_owned()));
        }
    }

    /// Makes up to `budget` waiting items of `handlers` pending again, at their due
    /// scores.
    fn unpark(&mut self, handlers: &[String], mut budget: usize) {
        for h in handlers {
            if budget == 0 || self.park.is_empty() {
                return;
            }
            let lo = (h.clone(), i64::MIN, String::new());
            let hi = (h.clone(), i64::MAX, String::new());
            let ids: Vec<(i64, String)> = self
                .park
                .range(lo..hi)
                .take(budget)
                .map(|(_, s, id)| (*s, id.clone()))
                .collect();
            budget -= ids.len();
            for (score, id) in ids {
                self.unlink(&id);
                self.make_pending(&id, score);
            }
        }
    }

    fn forget(&mut self, id: &str) {
        self.unlink(id);
        self.recs.remove(id);
    }

    fn bury(&mut self, id: &str, now: i64, err: String) {
        self.unlink(id);
        if let Some(rec) = self.recs.get_mut(id) {
            rec.pos = Pos::Dead(now);
            rec.err = Some(err);
            self.dead.insert((now, id.to_owned()));
        }
    }

    /// The delivery `token` of `id` is the current one and still in flight.
    fn current(&self, id: &str, token: &DeliveryToken) -> bool {
        self.recs.get(id).is_some_and(|r| {
            matches!(r.pos, Pos::Run(_)) && r.attempts == token.attempt && r.seq == Some(token.seq)
        })
    }

    fn view(&self, queue: u32, id: &str) -> Option<ItemView> {
        let rec = self.recs.get(id)?;
        let state = match rec.pos {
            Pos::Due(s) => ItemState::Pending { due_score_ms: s },
            Pos::Run(d) => ItemState::InFlight {
                deadline_ms: d,
                cancelled: rec.cancelled,
            },
            Pos::Dead(d) => ItemState::Dead { since_ms: d },
            Pos::Waiting(s) => ItemState::Waiting { due_score_ms: s },
        };
        Some(ItemView {
            item: codec::item_from_body(id.to_owned(), rec.body.clone(), rec.attempts),
            queue,
            state,
            last_error: rec.err.clone(),
        })
    }
}

#[derive(Debug)]
struct State {
    queues: Vec<Queue>,
    claims: u64,
    /// Delivery counter, store-wide so tokens stay unique across resizes.
    seq: u64,
    layout: Layout,
}

impl State {
    fn count(&self) -> u32 {
        self.layout.count
    }

    /// Re-places every item for `count` queues in one step (the lock makes a resize
    /// atomic here; Redis needs the epoch protocol instead). Leases are dropped:
    /// consumers see `StaleLease` and claim again.
    fn resize(&mut self, count: u32) {
        let mut fresh: Vec<Queue> = (0..count).map(|_| Queue::default()).collect();
        for old in std::mem::take(&mut self.queues) {
            for (id, rec) in old.recs {
                let q = &mut fresh[queue_for(&rec.body.key, count) as usize];
                match rec.pos {
                    Pos::Due(s) => {
                        q.due.insert((s, id.clone()));
                        if !rec.class.is_empty() {
                            q.mki.insert((rec.class.clone(), s, id.clone()));
                        }
                    }
                    Pos::Run(d) => {
                        q.run.insert((d, id.clone()));
                    }
                    Pos::Dead(d) => {
                        q.dead.insert((d, id.clone()));
                    }
                    Pos::Waiting(s) => {
                        q.park.insert((rec.body.handler.clone(), s, id.clone()));
                    }
                }
                q.recs.insert(id, rec);
            }
        }
        self.queues = fresh;
    }
}

/// In-memory delay store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    state: Arc<Mutex<State>>,
    /// Subscribers of [`DelayStore::wakes`]; closed ones are dropped on the next send.
    wake_subs: Arc<Mutex<Vec<tokio::sync::mpsc::Sender<Wake>>>>,
}

impl MemoryStore {
    /// A store of `count` queues reading time from `clock`.
    pub fn new(count: u32, clock: Arc<dyn Clock>) -> Self {
        let count = count.clamp(1, super::MAX_QUEUES);
        Self {
            clock,
            state: Arc::new(Mutex::new(State {
                queues: (0..count).map(|_| Queue::default()).collect(),
                claims: 0,
                seq: 0,
                layout: Layout::initial(count),
            })),
            wake_subs: Arc::default(),
        }
    }

    /// Sends `wakes` to every subscriber (outside the state lock).
    fn announce(&self, wakes: Vec<Wake>) {
        if wakes.is_empty() {
            return;
        }
        let mut subs = self.wake_subs.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|tx| !tx.is_closed());
        for tx in subs.iter() {
            for w in &wakes {
                // Full: that consumer is behind and looks soon anyway.
                let _ = tx.try_send(*w);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves state as consistent as the last
        // completed operation; keep serving rather than poisoning every later call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_queue(&self, queue: u32) -> Result<()> {
        let count = self.lock().count();
        if queue >= count {
            return Err(Error::invalid(
                "queue",
                format!("{queue} is outside 0..{count}"),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl DelayStore for MemoryStore {
    fn layout(&self) -> Layout {
        self.lock().layout.clone()
    }

    async fn apply_layout(&self, count: u32, revision: i64) -> Result<Layout> {
        if !(1..=super::MAX_QUEUES).contains(&count) {
            return Err(Error::invalid(
                "queue_count",
                format!("{count} is outside 1..={}", super::MAX_QUEUES),
            ));
        }
        let mut st = self.lock();
        if revision > st.layout.revision {
            if count != st.layout.count {
                st.resize(count);
                st.layout.epoch += 1;
                st.layout.count = count;
            }
            st.layout.revision = revision;
        }
        Ok(st.layout.clone())
    }

    async fn refresh_layout(&self) -> Result<Layout> {
        Ok(self.layout())
    }

    fn wants_migration(&self, _queue: u32) -> bool {
        false
    }

    async fn migrate(&self, _lease: &Lease, _max_items: u32) -> Result<MigrateStep> {
        Ok(MigrateStep {
            moved: 0,
            clean: true,
        })
    }

    async fn now_ms(&self) -> Result<i64> {
        Ok(self.clock.now_ms())
    }

    async fn enqueue(&self, items: Vec<NewItem>) -> Result<Vec<EnqueueOutcome>> {
        validate_batch(&items)?;
        let handlers: Vec<String> = items.iter().map(|i| i.handler.clone()).collect();
        let mut st = self.lock();
        let mut out = Vec::with_capacity(items.len());
        let mut wakes = Vec::new();
        for it in items {
            let key = it.routing_key().to_owned();
            let count = st.count();
            let qi = queue_for(&key, count) as usize;
            let q = &mut st.queues[qi];
            if q.recs.contains_key(&it.id) {
                out.push(EnqueueOutcome::Duplicate);
                continue;
            }
            let class = codec::merge_class(&it.handler, &key, it.merge_key.as_deref());
            q.recs.insert(
                it.id.clone(),
                Rec {
                    body: Body {
                        max_attempts: it.max_attempts,
                        due_at_ms: it.due_at_ms,
                        key,
                        handler: it.handler,
                        merge_key: it.merge_key,
                        payload: it.payload,
                        traceparent: it.traceparent,
                    },
                    attempts: 0,
                    seq: None,
                    class,
                    pos: Pos::Due(it.due_at_ms),
                    cancelled: false,
                    err: None,
                },
            );
            wakes.extend(q.wake_for(qi, it.due_at_ms));
            q.make_pending(&it.id, it.due_at_ms);
            out.push(EnqueueOutcome::Created);
        }
        drop(st);
        self.announce(wakes);
        super::count_enqueued(self.family(), handlers.iter().map(String::as_str), &out);
        Ok(out)
    }

    async fn get(&self, item: &ItemRef) -> Result<Option<ItemView>> {
        let st = self.lock();
        let qi = queue_for(&item.key, st.count());
        Ok(st.queues[qi as usize].view(qi, &item.id))
    }

    async fn cancel(&self, item: &ItemRef) -> Result<CancelOutcome> {
        let mut st = self.lock();
        let count = st.count();
        let q = &mut st.queues[queue_for(&item.key, count) as usize];
        let Some(rec) = q.recs.get_mut(&item.id) else {
            return Ok(CancelOutcome::NotFound);
        };
        if matches!(rec.pos, Pos::Run(_)) {
            rec.cancelled = true;
            return Ok(CancelOutcome::InFlight);
        }
        q.forget(&item.id);
        Ok(CancelOutcome::Cancelled)
    }

    async fn reschedule(&self, item: &ItemRef, due_at_ms: i64) -> Result<RescheduleOutcome> {
        crate::limits::check_due("due_at_ms", due_at_ms)?;
        let mut st = self.lock();
        let count = st.count();
        let qi = queue_for(&item.key, count) as usize;
        let q = &mut st.queues[qi];
        let Some(rec) = q.recs.get_mut(&item.id) else {
            return Ok(RescheduleOutcome::NotFound);
        };
        match rec.pos {
            Pos::Run(_) => Ok(RescheduleOutcome::InFlight),
            Pos::Dead(_) => Ok(RescheduleOutcome::Dead),
            Pos::Due(_) | Pos::Waiting(_) => {
                rec.body.due_at_ms = due_at_ms;
                // The head before the move, as the Redis store's script compares.
                let wake = q.wake_for(qi, due_at_ms);
                q.unlink(&item.id);
                q.make_pending(&item.id, due_at_ms);
                drop(st);
                self.announce(wake.into_iter().collect());
                Ok(RescheduleOutcome::Rescheduled)
            }
        }
    }

    async fn wakes(&self) -> Option<tokio::sync::mpsc::Receiver<Wake>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1_024);
        // Nothing announced before now reaches this subscriber.
        let _ = tx.try_send(Wake::ALL);
        self.wake_subs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        Some(rx)
    }

    async fn next_claim_ticket(&self) -> Result<u64> {
        let mut st = self.lock();
        st.claims += 1;
        Ok(st.claims)
    }

    async fn claim(&self, queue: u32, ttl_ms: u64) -> Result<Option<Lease>> {
        self.check_queue(queue)?;
        let now = self.clock.now_ms();
        let mut st = self.lock();
        let q = &mut st.queues[queue as usize];
        if q.lease.as_ref().is_some_and(|(_, exp)| *exp > now) {
            return Ok(None);
        }
        let token = new_lease_token();
        q.lease = Some((token.clone(), now + ttl_ms.max(1) as i64));
        Ok(Some(Lease { queue, token }))
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.check_queue(lease.queue)?;
        let mut st = self.lock();
        let q = &mut st.queues[lease.queue as usize];
        if q.lease.as_ref().is_some_and(|(t, _)| *t == lease.token) {
            q.lease = None;
        }
        Ok(())
    }

    async fn pop(&self, lease: &Lease, opts: PopOptions) -> Result<Popped> {
        self.check_queue(lease.queue)?;
        let now = self.clock.now_ms();
        let mut st = self.lock();
        let q = &mut st.queues[lease.queue as usize];
        match &mut q.lease {
            Some((t, exp)) if *t == lease.token && *exp > now => {
                *exp = now + opts.lease_ttl_ms.max(1) as i64;
            }
            _ => return Err(Error::StaleLease { queue: lease.queue }),
        }

        // 1. Reap expired in-flight items.
        let expired: Vec<(i64, String)> = q
            .run
            .range(..(now + 1, String::new()))
            .take(REAP_LIMIT)
            .cloned()
            .collect();
        for (_, id) in expired {
            q.unlink(&id);
            let Some(rec) = q.recs.get(&id) else { continue };
            if rec.cancelled {
                q.forget(&id);
            } else if rec.attempts >= rec.body.max_attempts {
                let err = format!("visibility timeout passed during attempt {}", rec.attempts);
                q.bury(&id, now, err);
            } else {
                q.make_pending(&id, now);
            }
        }

        // 2. Items waiting for a handler this consumer serves are due again.
        let limit = opts.max_items.max(1) as usize;
        q.unpark(&opts.serves, limit);

        // 3. Pop due items with their merge mates.
        let window = opts.merge_window_ms as i64;
        let mut picked: Vec<(String, usize)> = Vec::new(); // (id, group)
        let mut groups = 0usize;
        let due: Vec<(i64, String)> = q
            .due
            .range(..(now + 1, String::new()))
            .take(limit)
            .cloned()
            .collect();
        let mut taken = std::collections::HashSet::new();
        for (score, id) in due {
            if picked.len() >= limit {
                break;
            }
            if taken.contains(&id) {
                continue;
            }
            let class = q.recs.get(&id).map(|r| r.class.clone()).unwrap_or_default();
            let mates: Vec<String> = if class.is_empty() {
                Vec::new()
            } else {
                let lo = (class.clone(), i64::MIN, String::new());
                let hi = (class.clone(), score + window + 1, String::new());
                q.mki
                    .range(lo..hi)
                    .map(|(_, _, m)| m.clone())
                    .filter(|m| *m != id && !taken.contains(m))
                    .take(limit)
                    .collect()
            };
            // A group is never cut at the capacity boundary: when it does not fit
            // behind the deliveries already picked, it waits whole for the next pop.
            // Only a group larger than the whole request is delivered in pieces.
            if !picked.is_empty() && picked.len() + 1 + mates.len() > limit {
                break;
            }
            taken.insert(id.clone());
            groups += 1;
            picked.push((id, groups));
            for m in mates {
                if picked.len() >= limit {
                    break;
                }
                taken.insert(m.clone());
                picked.push((m, groups));
            }
        }
        let deadline = now + opts.visibility_ms.max(1) as i64;
        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut last_group = 0;
        let seq = st.seq + 1;
        if !picked.is_empty() {
            st.seq = seq;
        }
        let q = &mut st.queues[lease.queue as usize];
        for (id, group) in picked {
            q.unlink(&id);
            let Some(rec) = q.recs.get_mut(&id) else {
                continue;
            };
            rec.attempts += 1;
            rec.seq = Some(seq);
            rec.pos = Pos::Run(deadline);
            let token = DeliveryToken {
                attempt: rec.attempts,
                seq,
                pos: 0,
            };
            let item = codec::item_from_body(id.clone(), rec.body.clone(), rec.attempts);
            q.run.insert((deadline, id));
            let claimed = Claimed { item, token };
            match deliveries.last_mut() {
                Some(d) if group == last_group => d.items.push(claimed),
                _ => deliveries.push(Delivery {
                    queue: lease.queue,
                    items: vec![claimed],
                }),
            }
            last_group = group;
        }

        // 4. Next instant this queue needs a consumer.
        let next_due_ms = match (q.due.first(), q.run.first()) {
            (Some(a), Some(b)) => Some(a.0.min(b.0)),
            (a, b) => a.or(b).map(|x| x.0),
        };
        Ok(Popped {
            now_ms: now,
            next_due_ms,
            deliveries,
        })
    }

    async fn settle(&self, queue: u32, settlements: Vec<Settlement>) -> Result<Vec<bool>> {
        self.check_queue(queue)?;
        let now = self.clock.now_ms();
        let mut st = self.lock();
        let q = &mut st.queues[queue as usize];
        let mut out = Vec::with_capacity(settlements.len());
        for s in settlements {
            // Only the current, still in-flight delivery settles anything.
            if !q.current(&s.id, &s.token) {
                out.push(false);
                continue;
            }
            out.push(true);
            let Some(rec) = q.recs.get(&s.id) else {
                continue;
            };
            let (cancelled, attempts, max) = (rec.cancelled, rec.attempts, rec.body.max_attempts);
            match s.outcome {
                Outcome::Ack => q.forget(&s.id),
                _ if cancelled => q.forget(&s.id),
                Outcome::Release => {
                    q.unlink(&s.id);
                    if let Some(r) = q.recs.get_mut(&s.id) {
                        r.attempts = r.attempts.saturating_sub(1);
                    }
                    q.make_pending(&s.id, now);
                }
                Outcome::Park => {
                    if let Some(r) = q.recs.get_mut(&s.id) {
                        r.attempts = r.attempts.saturating_sub(1);
                    }
                    q.park(&s.id);
                }
                Outcome::Retry { error, .. } if attempts >= max => q.bury(&s.id, now, error),
                Outcome::Retry { delay_ms, error } => {
                    q.unlink(&s.id);
                    if let Some(r) = q.recs.get_mut(&s.id) {
                        r.err = Some(error);
                    }
                    q.make_pending(&s.id, now + delay_ms as i64);
                }
            }
        }
        Ok(out)
    }

    async fn extend(
        &self,
        queue: u32,
        items: &[(String, DeliveryToken)],
        visibility_ms: u64,
    ) -> Result<usize> {
        self.check_queue(queue)?;
        let deadline = self.clock.now_ms() + visibility_ms.max(1) as i64;
        let mut st = self.lock();
        let q = &mut st.queues[queue as usize];
        let mut n = 0;
        for (id, token) in items {
            if !q.current(id, token) {
                continue;
            }
            if let Some(rec) = q.recs.get_mut(id)
                && let Pos::Run(old) = rec.pos
            {
                rec.pos = Pos::Run(deadline);
                q.run.remove(&(old, id.clone()));
                q.run.insert((deadline, id.clone()));
                n += 1;
            }
        }
        Ok(n)
    }

    async fn stats(&self) -> Result<Vec<QueueStats>> {
        let now = self.clock.now_ms();
        let st = self.lock();
        Ok(st
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| QueueStats {
                queue: i as u32,
                pending: q.due.len() as u64,
                due_now: q.due.iter().take_while(|(s, _)| *s <= now).count() as u64,
                due_soon: q
                    .due
                    .iter()
                    .take_while(|(s, _)| *s <= now + DUE_SOON_MS)
                    .count() as u64,
                in_flight: q.run.len() as u64,
                dead: q.dead.len() as u64,
                next_due_ms: q.due.first().map(|x| x.0),
                moving: 0,
                waiting: q.park.len() as u64,
            })
            .collect())
    }

    async fn waiting_by_handler(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let st = self.lock();
        let mut out = std::collections::BTreeMap::new();
        for q in &st.queues {
            for (h, _, _) in &q.park {
                *out.entry(h.clone()).or_insert(0) += 1;
            }
        }
        Ok(out)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<ItemView>> {
        let st = self.lock();
        let mut out = Vec::new();
        for (i, q) in st.queues.iter().enumerate() {
            for (_, id) in &q.dead {
                if out.len() >= limit {
                    return Ok(out);
                }
                out.extend(q.view(i as u32, id));
            }
        }
        Ok(out)
    }

    async fn requeue_dead(&self, items: &[ItemRef], limit: usize) -> Result<usize> {
        let now = self.clock.now_ms();
        let limit = limit.max(1);
        let mut st = self.lock();
        let mut targets: Vec<(usize, String)> = Vec::new();
        if items.is_empty() {
            for (i, q) in st.queues.iter().enumerate() {
                targets.extend(q.dead.iter().map(|(_, id)| (i, id.clone())));
            }
            targets.truncate(limit);
        } else {
            targets = items
                .iter()
                .map(|r| (queue_for(&r.key, st.count()) as usize, r.id.clone()))
                .collect();
        }
        let mut moved = 0;
        let mut wakes = Vec::new();
        for (qi, id) in targets {
            let q = &mut st.queues[qi];
            if let Some(rec) = q.recs.get_mut(&id)
                && matches!(rec.pos, Pos::Dead(_))
            {
                rec.attempts = 0;
                wakes.extend(q.wake_for(qi, now));
                q.unlink(&id);
                q.make_pending(&id, now);
                moved += 1;
            }
        }
        drop(st);
        self.announce(wakes);
        Ok(moved)
    }
}
