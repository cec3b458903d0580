//! The delay-store conformance suite: one set of behaviours every [`DelayStore`]
//! must show. `tests/conformance_memory.rs` and `tests/conformance_redis.rs` run it
//! against the in-memory store and a real `redis-server`; the
//! [`conformance_suite!`](crate::conformance_suite) macro turns each case into its own
//! test so a failure names the behaviour.
//!
//! Cases run on the store's own clock (Redis `TIME` for Redis) and wait for it with
//! deadlines; none sleeps and hopes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use chime_shared::Error;
use chime_shared::queue::{
    CancelOutcome, Claimed, DelayStore, Delivery, EnqueueOutcome, ItemRef, ItemState, NewItem,
    Outcome, PopOptions, Popped, RescheduleOutcome, Settlement, Wake, queue_for,
};

/// Number of queues the suite's stores are built with.
pub const QUEUES: u32 = 4;

/// A shared store under test.
pub type Store = Arc<dyn DelayStore>;

fn opts() -> PopOptions {
    PopOptions {
        max_items: 100,
        visibility_ms: 30_000,
        lease_ttl_ms: 5_000,
        merge_window_ms: 1_000,
        serves: Arc::from(Vec::new()),
    }
}

/// [`opts`] for a consumer that serves `handlers`.
fn serving(handlers: &[&str]) -> PopOptions {
    PopOptions {
        serves: handlers.iter().map(|h| (*h).to_owned()).collect(),
        ..opts()
    }
}

/// Settles every item of `d` with `outcome`.
async fn settle_all(store: &Store, d: &Delivery, outcome: Outcome) -> Result<Vec<bool>> {
    let s = d
        .items
        .iter()
        .map(|c| Settlement {
            id: c.item.id.clone(),
            token: c.token,
            outcome: outcome.clone(),
        })
        .collect();
    Ok(store.settle(d.queue, s).await?)
}

/// Acks every delivery of `ds` in turn; what each item's ack answered, in order.
async fn ack_each(store: &Store, ds: &[Delivery]) -> Result<Vec<bool>> {
    let mut out = Vec::new();
    for d in ds {
        out.extend(ack(store, d).await?);
    }
    Ok(out)
}

/// Nothing left pending or in flight in any queue.
async fn nothing_left(store: &Store) -> Result<()> {
    let st = store.stats().await?;
    assert_eq!(st.iter().map(|s| s.in_flight + s.pending).sum::<u64>(), 0);
    Ok(())
}

/// Waits until the store's clock reads at least `t`.
pub async fn wait_store_time(store: &Store, t: i64) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = store.now_ms().await?;
        if now >= t {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("store clock never reached {t}");
        }
        tokio::time::sleep(Duration::from_millis(((t - now) as u64).clamp(1, 50))).await;
    }
}

/// Claims `queue` (waiting up to 10 s for its lease), pops once, releases.
pub async fn pop_queue(store: &Store, queue: u32, o: PopOptions) -> Result<Popped> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lease = loop {
        if let Some(l) = store.claim(queue, o.lease_ttl_ms).await? {
            break l;
        }
        if std::time::Instant::now() > deadline {
            bail!("could not claim queue {queue}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let popped = store.pop(&lease, o).await;
    store.release(&lease).await?;
    Ok(popped?)
}

/// Pops the queue of `item`.
pub async fn pop_for(store: &Store, item: &ItemRef, o: PopOptions) -> Result<Popped> {
    pop_queue(store, queue_for(&item.key, store.queue_count()), o).await
}

fn ids(p: &Popped) -> Vec<String> {
    p.deliveries
        .iter()
        .flat_map(|d| d.items.iter().map(|c| c.item.id.clone()))
        .collect()
}

fn only(p: &Popped) -> Result<&Delivery> {
    ensure!(
        p.deliveries.len() == 1,
        "expected one delivery, got {:?}",
        ids(p)
    );
    Ok(&p.deliveries[0])
}

async fn ack(store: &Store, d: &Delivery) -> Result<Vec<bool>> {
    let s = d
        .items
        .iter()
        .map(|c| Settlement {
            id: c.item.id.clone(),
            token: c.token,
            outcome: Outcome::Ack,
        })
        .collect();
    Ok(store.settle(d.queue, s).await?)
}

/// Enqueue answers `Duplicate` for an id that exists (pending or in flight),
/// also within one batch, and stores the first version only.
pub async fn enqueue_is_idempotent(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let a = NewItem::new("a", "h", now).payload("first");
    assert_eq!(
        store.enqueue(vec![a.clone()]).await?,
        [EnqueueOutcome::Created]
    );
    let again = NewItem::new("a", "h", now + 5_000).payload("second");
    assert_eq!(
        store.enqueue(vec![again]).await?,
        [EnqueueOutcome::Duplicate]
    );
    let batch = vec![
        NewItem::new("b", "h", now),
        NewItem::new("b", "h", now),
        NewItem::new("a", "h", now),
        NewItem::new("c", "h", now),
    ];
    assert_eq!(
        store.enqueue(batch).await?,
        [
            EnqueueOutcome::Created,
            EnqueueOutcome::Duplicate,
            EnqueueOutcome::Duplicate,
            EnqueueOutcome::Created
        ]
    );
    let view = store.get(&ItemRef::new("a")).await?.context("a stored")?;
    assert_eq!(&view.item.payload[..], b"first");
    assert_eq!(view.item.due_at_ms, now);
    // In flight is still a duplicate.
    let p = pop_for(&store, &ItemRef::new("a"), opts()).await?;
    assert!(ids(&p).contains(&"a".to_owned()));
    assert_eq!(
        store.enqueue(vec![NewItem::new("a", "h", now)]).await?,
        [EnqueueOutcome::Duplicate]
    );
    Ok(())
}

/// A cancelled item never fires, and a second cancel finds nothing.
pub async fn cancel_before_fire_never_fires(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let it = NewItem::new("x", "h", now + 300).key("user:1");
    let r = it.item_ref();
    store.enqueue(vec![it]).await?;
    assert_eq!(store.cancel(&r).await?, CancelOutcome::Cancelled);
    assert!(store.get(&r).await?.is_none());
    wait_store_time(&store, now + 400).await?;
    let p = pop_for(&store, &r, opts()).await?;
    assert!(
        p.deliveries.is_empty(),
        "cancelled item fired: {:?}",
        ids(&p)
    );
    assert_eq!(store.cancel(&r).await?, CancelOutcome::NotFound);
    Ok(())
}

/// Cancel of an item already handed to a worker says so, and the item is then never
/// retried or redelivered.
pub async fn cancel_after_fire_reports_in_flight(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let it = NewItem::new("y", "h", now).key("user:2");
    let r = it.item_ref();
    store.enqueue(vec![it]).await?;
    let p = pop_for(&store, &r, opts()).await?;
    let d = only(&p)?.clone();
    assert_eq!(store.cancel(&r).await?, CancelOutcome::InFlight);
    let v = store.get(&r).await?.context("still known")?;
    assert!(
        matches!(
            v.state,
            ItemState::InFlight {
                cancelled: true,
                ..
            }
        ),
        "{v:?}"
    );
    // The handler fails: a cancelled item is dropped instead of retried.
    let s = Settlement {
        id: "y".into(),
        token: d.items[0].token,
        outcome: Outcome::Retry {
            delay_ms: 0,
            error: "boom".into(),
        },
    };
    assert_eq!(store.settle(d.queue, vec![s]).await?, [true]);
    assert!(store.get(&r).await?.is_none());
    assert_eq!(store.cancel(&r).await?, CancelOutcome::NotFound);

    // Cancelled in flight, then the worker dies: the item is not redelivered.
    let it = NewItem::new("z", "h", now).key("user:2");
    store.enqueue(vec![it]).await?;
    let short = PopOptions {
        visibility_ms: 100,
        ..opts()
    };
    let p = pop_for(&store, &r, short).await?;
    assert_eq!(ids(&p), ["z"]);
    assert_eq!(
        store.cancel(&ItemRef::with_key("user:2", "z")).await?,
        CancelOutcome::InFlight
    );
    wait_store_time(&store, p.now_ms + 150).await?;
    let p = pop_for(&store, &r, opts()).await?;
    assert!(p.deliveries.is_empty(), "redelivered: {:?}", ids(&p));
    assert!(
        store
            .get(&ItemRef::with_key("user:2", "z"))
            .await?
            .is_none()
    );
    Ok(())
}

/// After a cancel, or after the item fired and was acked, the same id can be
/// enqueued again and fires exactly once.
pub async fn resubscribe_fires_once(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let r = ItemRef::with_key("user:3", "coupon:7");
    let item = || NewItem::new("coupon:7", "h", now).key("user:3");
    store.enqueue(vec![item()]).await?;
    assert_eq!(store.cancel(&r).await?, CancelOutcome::Cancelled);
    assert_eq!(
        store.enqueue(vec![item()]).await?,
        [EnqueueOutcome::Created]
    );
    let p = pop_for(&store, &r, opts()).await?;
    assert_eq!(ids(&p), ["coupon:7"]);
    assert_eq!(ack(&store, only(&p)?).await?, [true]);
    let p = pop_for(&store, &r, opts()).await?;
    assert!(p.deliveries.is_empty());
    // Re-subscribe after it fired.
    assert_eq!(
        store.enqueue(vec![item()]).await?,
        [EnqueueOutcome::Created]
    );
    let p = pop_for(&store, &r, opts()).await?;
    assert_eq!(ids(&p), ["coupon:7"]);
    assert_eq!(only(&p)?.items[0].item.attempt, 1);
    Ok(())
}

/// Reschedule moves a pending item earlier or later; in-flight and unknown items say so.
pub async fn reschedule_earlier_and_later(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let early = NewItem::new("early", "h", now + 60_000).key("k");
    let late = NewItem::new("late", "h", now).key("k");
    let (re, rl) = (early.item_ref(), late.item_ref());
    store.enqueue(vec![early, late]).await?;
    assert_eq!(
        store.reschedule(&re, now).await?,
        RescheduleOutcome::Rescheduled
    );
    assert_eq!(
        store.reschedule(&rl, now + 60_000).await?,
        RescheduleOutcome::Rescheduled
    );
    let v = store.get(&rl).await?.context("late")?;
    assert_eq!(v.item.due_at_ms, now + 60_000);
    assert_eq!(
        v.state,
        ItemState::Pending {
            due_score_ms: now + 60_000
        }
    );
    let p = pop_for(&store, &re, opts()).await?;
    assert_eq!(ids(&p), ["early"]);
    assert_eq!(p.deliveries[0].items[0].item.due_at_ms, now);
    assert_eq!(
        store.reschedule(&re, now).await?,
        RescheduleOutcome::InFlight
    );
    assert_eq!(
        store.reschedule(&ItemRef::new("nope"), now).await?,
        RescheduleOutcome::NotFound
    );
    assert!(matches!(
        store.reschedule(&rl, -5).await,
        Err(Error::InvalidArgument { ref field, .. }) if field == "due_at_ms"
    ));
    Ok(())
}

/// The next announcement of `rx`, within 10 s.
async fn next_wake(rx: &mut tokio::sync::mpsc::Receiver<Wake>) -> Result<Wake> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .context("no announcement within 10 s")?
        .context("the store stopped announcing")
}

/// A queue's earliest due time moving earlier is announced, by enqueue and by
/// reschedule; a move that leaves it where it was is not. (Consumers sleep until the
/// earliest due time they know of; an announcement is what makes them look sooner.)
pub async fn earlier_heads_are_announced(store: Store) -> Result<()> {
    let mut rx = store
        .wakes()
        .await
        .context("this store does not announce")?;
    // A subscription starts with "anything may have changed": from there on nothing
    // announced is missed.
    if let Some(first) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await? {
        ensure!(
            first == Wake::ALL,
            "the first announcement is {first:?}, not Wake::ALL"
        );
    } else {
        bail!("the store stopped announcing");
    }
    let now = store.now_ms().await?;
    let wake = |queue: u32, due: i64| Wake {
        queue,
        due_at_ms: due,
    };
    store
        .enqueue(vec![NewItem::new("a", "h", now + 60_000).key("k")])
        .await?;
    let q = store
        .get(&NewItem::new("a", "h", 0).key("k").item_ref())
        .await?
        .context("a")?
        .queue;
    assert_eq!(
        next_wake(&mut rx).await?,
        wake(q, now + 60_000),
        "first item"
    );
    // Later than the head: nothing to say. Earlier: said, with the new head.
    store
        .enqueue(vec![
            NewItem::new("b", "h", now + 90_000).key("k"),
            NewItem::new("c", "h", now + 80_000).key("k"),
        ])
        .await?;
    store
        .enqueue(vec![NewItem::new("d", "h", now + 30_000).key("k")])
        .await?;
    assert_eq!(
        next_wake(&mut rx).await?,
        wake(q, now + 30_000),
        "earlier item"
    );
    // Duplicates change nothing.
    store
        .enqueue(vec![NewItem::new("b", "h", now + 1_000).key("k")])
        .await?;
    let b = NewItem::new("b", "h", 0).key("k").item_ref();
    store.reschedule(&b, now + 70_000).await?;
    store.reschedule(&b, now + 20_000).await?;
    assert_eq!(
        next_wake(&mut rx).await?,
        wake(q, now + 20_000),
        "rescheduled earlier"
    );
    Ok(())
}

/// Items of one (key, handler, merge key) due within the window are delivered once,
/// together, at the earliest due time; others are not merged.
pub async fn merge_delivers_once_at_earliest(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let t0 = now + 300;
    let mk = |id: &str, h: &str, due: i64| NewItem::new(id, h, due).key("user:9").merge_key("u9");
    store
        .enqueue(vec![
            mk("m2", "remind", t0 + 500),
            mk("m1", "remind", t0),
            mk("m3", "remind", t0 + 5_000),
            mk("other", "push", t0 + 100),
        ])
        .await?;
    let r = ItemRef::with_key("user:9", "m1");
    let p = pop_for(&store, &r, opts()).await?;
    assert!(p.deliveries.is_empty(), "fired early: {:?}", ids(&p));
    wait_store_time(&store, t0).await?;
    let p = pop_for(&store, &r, opts()).await?;
    assert!(p.now_ms >= t0);
    let merged: Vec<_> = p.deliveries.iter().filter(|d| d.items.len() > 1).collect();
    assert_eq!(merged.len(), 1, "deliveries {:?}", ids(&p));
    let m: Vec<&str> = merged[0].items.iter().map(|c| c.item.id.as_str()).collect();
    assert_eq!(m, ["m1", "m2"]);
    assert!(
        !ids(&p).contains(&"m3".to_owned()),
        "m3 is outside the window"
    );
    // "other" has another handler: never merged with m1/m2 (and not due until t0+100).
    for d in &p.deliveries {
        if d.items.iter().any(|c| c.item.id == "other") {
            assert_eq!(d.items.len(), 1);
        }
    }
    assert_eq!(ack(&store, merged[0]).await?, [true, true]);
    Ok(())
}

/// A merge group is never cut at the capacity boundary: when it does not fit behind
/// what a pop already took it waits, whole, for the next pop; only a group larger
/// than a whole request is delivered in pieces.
pub async fn merge_group_is_never_cut_at_capacity(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let t0 = now + 200;
    let key = "user:cap";
    let one = |id: &str, due: i64| NewItem::new(id, "remind", due).key(key);
    let mk = |id: &str, due: i64| one(id, due).merge_key("c");
    store
        .enqueue(vec![
            one("solo", t0),
            mk("g1", t0 + 1),
            mk("g2", t0 + 2),
            mk("g3", t0 + 3),
        ])
        .await?;
    wait_store_time(&store, t0 + 3).await?;
    let r = ItemRef::with_key(key, "solo");
    let cap = |n: u32| PopOptions {
        max_items: n,
        ..opts()
    };
    // Room for 3: "solo" and then a group of 3 that does not fit; it stays whole.
    let p = pop_for(&store, &r, cap(3)).await?;
    assert_eq!(ids(&p), ["solo"], "deliveries {:?}", p.deliveries);
    ack(&store, &p.deliveries[0]).await?;
    let p = pop_for(&store, &r, cap(3)).await?;
    assert_eq!(p.deliveries.len(), 1, "deliveries {:?}", ids(&p));
    assert_eq!(ids(&p), ["g1", "g2", "g3"]);
    ack(&store, &p.deliveries[0]).await?;
    // A group larger than the whole request: delivered in request-sized pieces.
    let t1 = store.now_ms().await? + 100;
    store
        .enqueue(vec![mk("h1", t1), mk("h2", t1 + 1), mk("h3", t1 + 2)])
        .await?;
    wait_store_time(&store, t1 + 2).await?;
    let p = pop_for(&store, &r, cap(2)).await?;
    assert_eq!(ids(&p), ["h1", "h2"]);
    assert_eq!(p.deliveries.len(), 1);
    ack(&store, &p.deliveries[0]).await?;
    let p = pop_for(&store, &r, cap(2)).await?;
    assert_eq!(ids(&p), ["h3"]);
    ack(&store, &p.deliveries[0]).await?;
    Ok(())
}

/// No item is handed out before its due time by the store's clock.
pub async fn never_fires_before_due(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let items: Vec<NewItem> = (0..60)
        .map(|i| NewItem::new(format!("e{i}"), "h", now + 10 * i))
        .collect();
    store.enqueue(items).await?;
    let mut seen = std::collections::HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < 60 {
        ensure!(
            std::time::Instant::now() < deadline,
            "only {} fired",
            seen.len()
        );
        for q in 0..store.queue_count() {
            let p = pop_queue(&store, q, opts()).await?;
            for d in &p.deliveries {
                for c in &d.items {
                    ensure!(
                        p.now_ms >= c.item.due_at_ms,
                        "{} fired at {} before its due time {}",
                        c.item.id,
                        p.now_ms,
                        c.item.due_at_ms
                    );
                    ensure!(seen.insert(c.item.id.clone()), "{} fired twice", c.item.id);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// An in-flight item whose visibility deadline passes is delivered again; the old
/// delivery's token then settles nothing.
pub async fn visibility_timeout_redelivers(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let it = NewItem::new("v", "h", now);
    let r = it.item_ref();
    store.enqueue(vec![it]).await?;
    let short = PopOptions {
        visibility_ms: 200,
        ..opts()
    };
    let p1 = pop_for(&store, &r, short.clone()).await?;
    let first = only(&p1)?.clone();
    assert_eq!(first.items[0].item.attempt, 1);
    let p = pop_for(&store, &r, short.clone()).await?;
    assert!(p.deliveries.is_empty(), "redelivered before the deadline");
    wait_store_time(&store, p1.now_ms + 200).await?;
    let p2 = pop_for(&store, &r, short).await?;
    let second = only(&p2)?.clone();
    assert_eq!(second.items[0].item.attempt, 2);
    assert_ne!(first.items[0].token, second.items[0].token);
    assert_eq!(
        ack(&store, &first).await?,
        [false],
        "stale token must not settle"
    );
    // A stale and a current delivery in one call: only the current one settles.
    let both = Delivery {
        queue: second.queue,
        items: vec![first.items[0].clone(), second.items[0].clone()],
    };
    assert_eq!(ack(&store, &both).await?, [false, true]);
    assert!(store.get(&r).await?.is_none());
    Ok(())
}

/// Extending a delivery keeps it in flight past its first deadline.
pub async fn extend_keeps_item_in_flight(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let it = NewItem::new("long", "h", now);
    let r = it.item_ref();
    store.enqueue(vec![it]).await?;
    let short = PopOptions {
        visibility_ms: 300,
        ..opts()
    };
    let p = pop_for(&store, &r, short.clone()).await?;
    let d = only(&p)?.clone();
    let tok = vec![(d.items[0].item.id.clone(), d.items[0].token)];
    assert_eq!(store.extend(d.queue, &tok, 10_000).await?, 1);
    wait_store_time(&store, p.now_ms + 500).await?;
    let p2 = pop_for(&store, &r, short).await?;
    assert!(p2.deliveries.is_empty(), "redelivered despite extension");
    let v = store.get(&r).await?.context("in flight")?;
    assert!(
        matches!(v.state, ItemState::InFlight { deadline_ms, .. } if deadline_ms >= p.now_ms + 10_000)
    );
    // A stale token extends nothing.
    let mut stale = tok.clone();
    stale[0].1.seq += 1;
    assert_eq!(store.extend(d.queue, &stale, 10_000).await?, 0);
    Ok(())
}

/// Items popped together are settled one by one, each only once: an extended one
/// stays in flight alone, a double ack or an old token of a reused id settles
/// nothing, and `get` and stats see each item that is still in flight.
pub async fn one_pop_settles_item_by_item(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    // Ten: enough for a store that keeps small pops item by item to batch them.
    let items: Vec<NewItem> = (0..10)
        .map(|i| NewItem::new(format!("b{i}"), "h", now).key("one-pop"))
        .collect();
    let r: Vec<ItemRef> = items.iter().map(NewItem::item_ref).collect();
    store.enqueue(items).await?;
    let p = pop_for(&store, &r[0], opts()).await?;
    assert_eq!(
        ids(&p),
        ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9"]
    );
    let c: Vec<Claimed> = p.deliveries.iter().map(|d| d.items[0].clone()).collect();
    let q = p.deliveries[0].queue;
    let one = |k: usize| Delivery {
        queue: q,
        items: vec![c[k].clone()],
    };
    let in_flight = || async {
        let st = store.stats().await?;
        anyhow::Ok(st.iter().map(|s| s.in_flight).sum::<u64>())
    };
    assert_eq!(in_flight().await?, 10);
    assert_eq!(
        store
            .extend(q, &[(c[1].item.id.clone(), c[1].token)], 60_000)
            .await?,
        1
    );
    assert_eq!(ack(&store, &one(0)).await?, [true]);
    assert_eq!(ack(&store, &one(0)).await?, [false], "acked twice");
    assert_eq!(in_flight().await?, 9);
    let v = store.get(&r[1]).await?.context("b1 in flight")?;
    assert!(
        matches!(v.state, ItemState::InFlight { deadline_ms, .. } if deadline_ms >= p.now_ms + 60_000),
        "extended: {:?}",
        v.state
    );
    let v = store.get(&r[3]).await?.context("b3 in flight")?;
    assert!(
        matches!(v.state, ItemState::InFlight { deadline_ms, .. } if deadline_ms < p.now_ms + 60_000),
        "b3: {:?}",
        v.state
    );
    assert_eq!(v.item.attempt, 1);
    assert_eq!(ack(&store, &one(1)).await?, [true], "the extended delivery");
    let retry = Outcome::Retry {
        delay_ms: 0,
        error: "e".into(),
    };
    assert_eq!(settle_all(&store, &one(2), retry.clone()).await?, [true]);
    assert_eq!(settle_all(&store, &one(2), retry).await?, [false]);
    assert_eq!(ack(&store, &one(2)).await?, [false], "b2 is pending again");
    let rest = Delivery {
        queue: q,
        items: c[3..].to_vec(),
    };
    assert_eq!(ack(&store, &rest).await?, [true; 7]);
    assert_eq!(in_flight().await?, 0);
    // b0 again, under the same id: the first delivery's token settles nothing of it.
    let again = NewItem::new("b0", "h", now).key("one-pop");
    assert_eq!(store.enqueue(vec![again]).await?, [EnqueueOutcome::Created]);
    let p2 = pop_for(&store, &r[0], opts()).await?;
    let mut got = ids(&p2);
    got.sort();
    assert_eq!(got, ["b0", "b2"]);
    assert_eq!(ack(&store, &one(0)).await?, [false], "the old b0 token");
    assert!(store.get(&r[0]).await?.is_some(), "the new b0 was settled");
    assert_eq!(ack_each(&store, &p2.deliveries).await?, [true, true]);
    assert_eq!(in_flight().await?, 0);
    Ok(())
}

/// Extending every item a pop took (as a worker extends all it holds) keeps them
/// all in flight past their first deadline, each still settled by its own token.
pub async fn extending_all_items_of_a_pop_keeps_them_all(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let items: Vec<NewItem> = (0..10)
        .map(|i| NewItem::new(format!("x{i}"), "h", now).key("extend-all"))
        .collect();
    let r = items[0].item_ref();
    store.enqueue(items).await?;
    let short = PopOptions {
        visibility_ms: 300,
        ..opts()
    };
    let p = pop_for(&store, &r, short.clone()).await?;
    assert_eq!(p.item_count(), 10);
    let q = p.deliveries[0].queue;
    let held: Vec<(String, chime_shared::queue::DeliveryToken)> = p
        .deliveries
        .iter()
        .map(|d| (d.items[0].item.id.clone(), d.items[0].token))
        .collect();
    assert_eq!(store.extend(q, &held, 10_000).await?, 10);
    wait_store_time(&store, p.now_ms + 500).await?;
    let p2 = pop_for(&store, &r, short).await?;
    assert!(p2.deliveries.is_empty(), "redelivered despite extension");
    let v = store.get(&r).await?.context("in flight")?;
    assert!(
        matches!(v.state, ItemState::InFlight { deadline_ms, .. } if deadline_ms >= p.now_ms + 10_000),
        "{:?}",
        v.state
    );
    assert_eq!(ack_each(&store, &p.deliveries).await?, [true; 10]);
    nothing_left(&store).await
}

/// When the deadline of items popped together passes, only those never settled are
/// delivered again, each on its next attempt.
pub async fn expired_pop_redelivers_only_unsettled_items(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let items: Vec<NewItem> = (0..9)
        .map(|i| NewItem::new(format!("e{i}"), "h", now).key("expiring"))
        .collect();
    let r = items[0].item_ref();
    store.enqueue(items).await?;
    let short = PopOptions {
        visibility_ms: 200,
        ..opts()
    };
    let p1 = pop_for(&store, &r, short.clone()).await?;
    assert_eq!(ids(&p1).len(), 9);
    assert_eq!(ack(&store, &p1.deliveries[0]).await?, [true]);
    wait_store_time(&store, p1.now_ms + 200).await?;
    let p2 = pop_for(&store, &r, short).await?;
    assert_eq!(ids(&p2), ids(&p1)[1..]);
    assert!(p2.deliveries.iter().all(|d| d.items[0].item.attempt == 2));
    assert_eq!(ack(&store, &p1.deliveries[1]).await?, [false], "stale");
    assert_eq!(
        ack_each(&store, &p2.deliveries).await?,
        vec![true; p2.deliveries.len()]
    );
    nothing_left(&store).await?;
    Ok(())
}

/// A failed item is retried after its backoff; after `max_attempts` it is
/// dead-lettered with its last error, and requeue brings it back.
pub async fn retry_then_dead_letter_then_requeue(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let it = NewItem::new("d", "h", now).max_attempts(2).payload("p");
    let r = it.item_ref();
    store.enqueue(vec![it]).await?;
    let fail = |d: &Delivery, delay: u64, msg: &str| Settlement {
        id: d.items[0].item.id.clone(),
        token: d.items[0].token,
        outcome: Outcome::Retry {
            delay_ms: delay,
            error: msg.into(),
        },
    };
    let p = pop_for(&store, &r, opts()).await?;
    let d = only(&p)?.clone();
    assert_eq!(
        store.settle(d.queue, vec![fail(&d, 300, "boom1")]).await?,
        [true]
    );
    let v = store.get(&r).await?.context("pending again")?;
    assert_eq!(v.last_error.as_deref(), Some("boom1"));
    let p = pop_for(&store, &r, opts()).await?;
    assert!(p.deliveries.is_empty(), "retried before its backoff");
    wait_store_time(&store, p.now_ms + 300).await?;
    let p = pop_for(&store, &r, opts()).await?;
    let d = only(&p)?.clone();
    assert_eq!(d.items[0].item.attempt, 2);
    assert_eq!(
        store.settle(d.queue, vec![fail(&d, 0, "boom2")]).await?,
        [true]
    );
    let dead = store.dead_letters(10).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].item.id, "d");
    assert_eq!(dead[0].last_error.as_deref(), Some("boom2"));
    assert!(matches!(dead[0].state, ItemState::Dead { .. }));
    assert_eq!(store.stats().await?.iter().map(|s| s.dead).sum::<u64>(), 1);
    assert_eq!(store.reschedule(&r, now).await?, RescheduleOutcome::Dead);
    assert_eq!(store.requeue_dead(&[], 10).await?, 1);
    assert!(store.dead_letters(10).await?.is_empty());
    let p = pop_for(&store, &r, opts()).await?;
    let d = only(&p)?.clone();
    assert_eq!(d.items[0].item.attempt, 1);
    assert_eq!(&d.items[0].item.payload[..], b"p");
    // Requeue by reference, and cancel of a dead letter.
    assert_eq!(
        store.settle(d.queue, vec![fail(&d, 0, "boom3")]).await?,
        [true]
    );
    let p = pop_for(&store, &r, opts()).await?;
    let d = only(&p)?.clone();
    assert_eq!(
        store.settle(d.queue, vec![fail(&d, 0, "boom4")]).await?,
        [true]
    );
    assert_eq!(store.requeue_dead(std::slice::from_ref(&r), 10).await?, 1);
    let p = pop_for(&store, &r, opts()).await?;
    let d = only(&p)?.clone();
    assert_eq!(store.settle(d.queue, vec![fail(&d, 0, "x")]).await?, [true]);
    let p = pop_for(&store, &r, opts()).await?;
    let d = only(&p)?.clone();
    assert_eq!(store.settle(d.queue, vec![fail(&d, 0, "y")]).await?, [true]);
    assert_eq!(store.cancel(&r).await?, CancelOutcome::Cancelled);
    assert!(store.dead_letters(10).await?.is_empty());
    Ok(())
}

/// Release hands an item back due now without counting the attempt.
pub async fn release_does_not_count_attempt(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let it = NewItem::new("rel", "h", now).max_attempts(1);
    let r = it.item_ref();
    store.enqueue(vec![it]).await?;
    for _ in 0..3 {
        let p = pop_for(&store, &r, opts()).await?;
        let d = only(&p)?.clone();
        assert_eq!(d.items[0].item.attempt, 1);
        let s = Settlement {
            id: "rel".into(),
            token: d.items[0].token,
            outcome: Outcome::Release,
        };
        assert_eq!(store.settle(d.queue, vec![s]).await?, [true]);
    }
    assert!(store.dead_letters(10).await?.is_empty());
    Ok(())
}

/// An item parked because its consumer does not serve its handler waits without an
/// attempt counted, out of reach of pops that do not serve it, and goes out (merge
/// groups whole) to the first pop that serves its handler; stats count it.
pub async fn parked_items_wait_for_their_handler(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let a = NewItem::new("pa", "h1", now).key("user:p").max_attempts(1);
    let b1 = NewItem::new("pb1", "h2", now).key("user:p").merge_key("m");
    let b2 = NewItem::new("pb2", "h2", now + 100)
        .key("user:p")
        .merge_key("m");
    let r = a.item_ref();
    store.enqueue(vec![a, b1, b2]).await?;
    let p = pop_for(&store, &r, opts()).await?;
    ensure!(p.deliveries.len() == 2, "{:?}", ids(&p));
    for d in &p.deliveries {
        assert_eq!(
            settle_all(&store, d, Outcome::Park).await?,
            vec![true; d.items.len()]
        );
    }
    let v = store.get(&r).await?.context("pa lost")?;
    ensure!(
        matches!(v.state, ItemState::Waiting { due_score_ms } if due_score_ms == now),
        "{v:?}"
    );
    ensure!(v.item.attempt == 0, "a park counted an attempt: {v:?}");
    let st = store.stats().await?;
    ensure!(st.iter().map(|s| s.waiting).sum::<u64>() == 3, "{st:?}");
    ensure!(st.iter().map(|s| s.pending).sum::<u64>() == 0, "{st:?}");
    let by = store.waiting_by_handler().await?;
    ensure!(
        by.get("h1") == Some(&1) && by.get("h2") == Some(&2) && by.len() == 2,
        "{by:?}"
    );
    // Pops that do not serve the handlers get nothing, and see nothing due.
    let p = pop_for(&store, &r, serving(&["other"])).await?;
    ensure!(p.deliveries.is_empty() && p.next_due_ms.is_none(), "{p:?}");
    // A pop serving h2 takes the merge group whole, at its first attempt.
    let p = pop_for(&store, &r, serving(&["h2"])).await?;
    let d = only(&p)?.clone();
    ensure!(ids(&p) == ["pb1", "pb2"], "{:?}", ids(&p));
    ensure!(d.items.iter().all(|c| c.item.attempt == 1), "{d:?}");
    ack(&store, &d).await?;
    // h1's item, parked with max_attempts 1, still gets its one attempt.
    let p = pop_for(&store, &r, serving(&["h0", "h1"])).await?;
    let d = only(&p)?.clone();
    ensure!(ids(&p) == ["pa"] && d.items[0].item.attempt == 1, "{p:?}");
    ack(&store, &d).await?;
    let st = store.stats().await?;
    ensure!(st.iter().map(|s| s.waiting).sum::<u64>() == 0, "{st:?}");
    ensure!(store.waiting_by_handler().await?.is_empty());
    Ok(())
}

/// A waiting item can be found, cancelled, and rescheduled (which makes it pending
/// at the new time).
pub async fn waiting_items_cancel_and_reschedule(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let x = NewItem::new("wx", "h", now).key("user:w");
    let y = NewItem::new("wy", "h", now).key("user:w");
    let (rx, ry) = (x.item_ref(), y.item_ref());
    store.enqueue(vec![x, y]).await?;
    let p = pop_for(&store, &rx, opts()).await?;
    for d in &p.deliveries {
        settle_all(&store, d, Outcome::Park).await?;
    }
    assert_eq!(store.cancel(&rx).await?, CancelOutcome::Cancelled);
    ensure!(
        store.get(&rx).await?.is_none(),
        "cancelled item still there"
    );
    assert_eq!(store.cancel(&rx).await?, CancelOutcome::NotFound);
    let later = store.now_ms().await? + 300;
    assert_eq!(
        store.reschedule(&ry, later).await?,
        RescheduleOutcome::Rescheduled
    );
    let v = store.get(&ry).await?.context("wy lost")?;
    ensure!(
        matches!(v.state, ItemState::Pending { due_score_ms } if due_score_ms == later),
        "{v:?}"
    );
    wait_store_time(&store, later).await?;
    let p = pop_for(&store, &ry, opts()).await?;
    ensure!(ids(&p) == ["wy"], "{:?}", ids(&p));
    let st = store.stats().await?;
    ensure!(st.iter().map(|s| s.waiting).sum::<u64>() == 0, "{st:?}");
    Ok(())
}

/// A consumer whose lease expired (and was taken by another) cannot pop; releasing a
/// stale lease does not free the new holder's.
pub async fn expired_lease_cannot_pop(store: Store) -> Result<()> {
    let a = store.claim(1, 200).await?.context("first claim")?;
    assert!(
        store.claim(1, 200).await?.is_none(),
        "lease handed out twice"
    );
    let now = store.now_ms().await?;
    wait_store_time(&store, now + 250).await?;
    let b = store.claim(1, 5_000).await?.context("claim after expiry")?;
    match store.pop(&a, opts()).await {
        Err(Error::StaleLease { queue: 1 }) => {}
        other => bail!("stale lease popped: {other:?}"),
    }
    store.pop(&b, opts()).await?;
    store.release(&a).await?;
    assert!(
        store.claim(1, 200).await?.is_none(),
        "stale release freed the lease"
    );
    store.release(&b).await?;
    assert!(store.claim(1, 200).await?.is_some());
    // Tickets increase.
    let t1 = store.next_claim_ticket().await?;
    let t2 = store.next_claim_ticket().await?;
    assert!(t2 > t1);
    Ok(())
}

/// Bad input is refused naming the field, and nothing of the batch is stored.
pub async fn invalid_input_stores_nothing(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let good = NewItem::new("good", "h", now);
    let cases: Vec<(NewItem, &str)> = vec![
        (
            NewItem::new("big", "h", now).payload(vec![0u8; 64 * 1024 + 1]),
            "items[1].payload",
        ),
        (NewItem::new("", "h", now), "items[1].id"),
        (NewItem::new("bad", "no spaces", now), "items[1].handler"),
        (NewItem::new("bad", "h", -1), "items[1].due_at_ms"),
        (
            NewItem::new("bad", "h", now).max_attempts(0),
            "items[1].max_attempts",
        ),
        (
            NewItem::new("bad", "h", now).merge_key("a\nb"),
            "items[1].merge_key",
        ),
    ];
    for (bad, field) in cases {
        match store.enqueue(vec![good.clone(), bad]).await {
            Err(Error::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => bail!("expected InvalidArgument on {field}, got {other:?}"),
        }
    }
    assert!(store.get(&good.item_ref()).await?.is_none());
    let total: u64 = store.stats().await?.iter().map(|s| s.pending).sum();
    assert_eq!(total, 0);
    Ok(())
}

/// Stats count pending, due, in-flight and dead items per queue.
pub async fn stats_count_states(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    // 5 due now, 3 due in 30 s (soon), 12 in 10 minutes.
    let due = |i: i32| match i {
        0..5 => now,
        5..8 => now + 30_000,
        _ => now + 600_000,
    };
    let items: Vec<NewItem> = (0..20)
        .map(|i| NewItem::new(format!("s{i}"), "h", due(i)))
        .collect();
    store.enqueue(items).await?;
    let st = store.stats().await?;
    assert_eq!(st.len() as u32, store.queue_count());
    assert_eq!(st.iter().map(|s| s.pending).sum::<u64>(), 20);
    assert_eq!(st.iter().map(|s| s.due_now).sum::<u64>(), 5);
    assert_eq!(st.iter().map(|s| s.due_soon).sum::<u64>(), 8);
    assert!(st.iter().filter_map(|s| s.next_due_ms).all(|d| d >= now));
    let mut popped = 0;
    for q in 0..store.queue_count() {
        popped += pop_queue(&store, q, opts()).await?.item_count();
    }
    assert_eq!(popped, 5);
    let st = store.stats().await?;
    assert_eq!(st.iter().map(|s| s.in_flight).sum::<u64>(), 5);
    assert_eq!(st.iter().map(|s| s.pending).sum::<u64>(), 15);
    Ok(())
}

/// Claims each queue in turn and runs migration steps until the store reports no
/// resize in progress (fails after 20 s).
pub async fn finish_resize(store: &Store) -> Result<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut moved = 0;
    while store.layout().in_transition() {
        ensure!(
            std::time::Instant::now() < deadline,
            "resize never finished: {:?}",
            store.layout()
        );
        for q in 0..store.queue_count() {
            if !store.wants_migration(q) {
                continue;
            }
            if let Some(lease) = store.claim(q, 5_000).await? {
                let step = store.migrate(&lease, 50).await;
                store.release(&lease).await?;
                moved += step?.moved;
            }
        }
        store.refresh_layout().await?;
    }
    Ok(moved)
}

/// Resizing moves items to their new homes: every item is found by key and id
/// during and after, none is lost or doubled, none fires early, and dead letters
/// and merge groups survive the move.
pub async fn resize_keeps_every_item(store: Store) -> Result<()> {
    let now = store.now_ms().await?;
    let later = now + 600;
    let mut items: Vec<NewItem> = (0..200)
        .map(|i| NewItem::new(format!("r{i}"), "h", later + i % 7).key(format!("user:{i}")))
        .collect();
    items.push(NewItem::new("m1", "h", later).key("user:m").merge_key("m"));
    items.push(
        NewItem::new("m2", "h", later + 100)
            .key("user:m")
            .merge_key("m"),
    );
    items.push(NewItem::new("dead", "h", now).key("user:d").max_attempts(1));
    // Make one item wait for its handler (before anything else is due).
    store
        .enqueue(vec![NewItem::new("wait", "hw", now).key("user:wait")])
        .await?;
    let p = pop_for(&store, &ItemRef::with_key("user:wait", "wait"), opts()).await?;
    ensure!(ids(&p) == ["wait"], "{:?}", ids(&p));
    settle_all(&store, only(&p)?, Outcome::Park).await?;
    store.enqueue(items).await?;
    // Make one dead letter.
    let p = pop_for(&store, &ItemRef::with_key("user:d", "dead"), opts()).await?;
    let d = only(&p)?.clone();
    let fail = Settlement {
        id: "dead".into(),
        token: d.items[0].token,
        outcome: Outcome::Retry {
            delay_ms: 0,
            error: "x".into(),
        },
    };
    assert_eq!(store.settle(d.queue, vec![fail]).await?, [true]);

    let before = store.layout();
    let grown = store.apply_layout(QUEUES + 5, before.revision + 1).await?;
    ensure!(
        grown.count == QUEUES + 5 && grown.epoch > before.epoch,
        "{grown:?}"
    );
    // An older revision changes nothing.
    let same = store.apply_layout(2, before.revision).await?;
    ensure!(same.count == QUEUES + 5, "older revision applied: {same:?}");
    // Lookups work mid-resize; a duplicate enqueue is still a duplicate.
    ensure!(
        store
            .get(&ItemRef::with_key("user:3", "r3"))
            .await?
            .is_some()
    );
    let dup = store
        .enqueue(vec![NewItem::new("r5", "h", later).key("user:5")])
        .await?;
    ensure!(dup == [EnqueueOutcome::Duplicate], "{dup:?}");
    assert_eq!(
        store.cancel(&ItemRef::with_key("user:7", "r7")).await?,
        CancelOutcome::Cancelled
    );
    finish_resize(&store).await?;
    let shrunk = store.apply_layout(2, grown.revision + 1).await?;
    ensure!(shrunk.count == 2, "{shrunk:?}");
    // New items go to new homes while the old layout drains.
    store
        .enqueue(vec![NewItem::new("new", "h", later).key("user:new")])
        .await?;
    finish_resize(&store).await?;
    ensure!(
        store.queue_count() == 2,
        "removed queues still polled: {}",
        store.queue_count()
    );
    // Everything is in its current home.
    let layout = store.layout();
    for i in (0..200).filter(|i| *i != 7) {
        let v = store
            .get(&ItemRef::with_key(format!("user:{i}"), format!("r{i}")))
            .await?
            .with_context(|| format!("r{i} lost"))?;
        ensure!(
            v.queue == layout.home(&format!("user:{i}")),
            "r{i} misplaced"
        );
    }
    ensure!(
        store
            .get(&ItemRef::with_key("user:7", "r7"))
            .await?
            .is_none(),
        "cancelled item came back"
    );
    let dead = store.dead_letters(10).await?;
    ensure!(dead.len() == 1 && dead[0].item.id == "dead", "{dead:?}");
    let w = store
        .get(&ItemRef::with_key("user:wait", "wait"))
        .await?
        .context("waiting item lost")?;
    ensure!(
        matches!(w.state, ItemState::Waiting { .. }) && w.queue == layout.home("user:wait"),
        "waiting item not moved as waiting: {w:?}"
    );
    // Each fires once, never early, and the merge group is still one delivery.
    wait_store_time(&store, later + 7).await?;
    let mut seen = std::collections::HashSet::new();
    let mut merged = 0;
    for _ in 0..3 {
        for q in 0..store.queue_count() {
            let p = pop_queue(&store, q, opts()).await?;
            for d in &p.deliveries {
                if d.items.len() == 2 {
                    merged += 1;
                }
                for c in &d.items {
                    ensure!(
                        c.item.id.starts_with('m') || p.now_ms >= c.item.due_at_ms,
                        "{} early",
                        c.item.id
                    );
                    ensure!(seen.insert(c.item.id.clone()), "{} twice", c.item.id);
                }
            }
        }
    }
    ensure!(seen.len() == 199 + 2 + 1, "fired {} of 202", seen.len());
    ensure!(merged == 1, "merge group split by the move");
    let p = pop_for(
        &store,
        &ItemRef::with_key("user:wait", "wait"),
        serving(&["hw"]),
    )
    .await?;
    ensure!(
        ids(&p) == ["wait"],
        "waiting item not served: {:?}",
        ids(&p)
    );
    Ok(())
}

/// Generates one `#[tokio::test]` per conformance case; `$make` is an async
/// expression yielding `(Store, guard)` (the guard keeps servers alive).
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::conformance_suite!(@cases $make;
            enqueue_is_idempotent,
            cancel_before_fire_never_fires,
            cancel_after_fire_reports_in_flight,
            resubscribe_fires_once,
            reschedule_earlier_and_later,
            earlier_heads_are_announced,
            merge_delivers_once_at_earliest,
            merge_group_is_never_cut_at_capacity,
            never_fires_before_due,
            visibility_timeout_redelivers,
            extend_keeps_item_in_flight,
            one_pop_settles_item_by_item,
            extending_all_items_of_a_pop_keeps_them_all,
            expired_pop_redelivers_only_unsettled_items,
            retry_then_dead_letter_then_requeue,
            release_does_not_count_attempt,
            parked_items_wait_for_their_handler,
            waiting_items_cancel_and_reschedule,
            expired_lease_cannot_pop,
            invalid_input_stores_nothing,
            stats_count_states,
            resize_keeps_every_item,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() -> anyhow::Result<()> {
                let (store, _guard) = $make.await?;
                $crate::conformance::$case(store).await
            }
        )*
    };
}
