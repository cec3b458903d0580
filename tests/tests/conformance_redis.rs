//! The delay-store conformance suite against a real `redis-server` started on a free
//! port for each test.

use std::sync::Arc;

use chime_tests::RedisServer;
use chime_tests::conformance::{QUEUES, Store};

async fn make() -> anyhow::Result<(Store, RedisServer)> {
    let server = RedisServer::start().await?;
    let store = server.store("conf", QUEUES).await?;
    Ok((Arc::new(store), server))
}

chime_tests::conformance_suite!(make());

/// A Redis user that may not publish (Redis 7 gives new ACL users no channel access
/// by default) still enqueues, reschedules and pops: the announcement is a hint the
/// scripts drop when Redis refuses it.
#[tokio::test]
async fn a_user_without_channel_access_still_enqueues() -> anyhow::Result<()> {
    use anyhow::ensure;
    use chime_shared::queue::redis_store::RedisStore;
    use chime_shared::queue::{DelayStore, NewItem, PopOptions, QueueLayout};
    use chime_shared::redis_conn::{RedisConn, RedisSpec};

    let server = RedisServer::start().await?;
    let mut admin = server.conn().await?;
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "nochan",
                "on",
                ">pw",
                "~*",
                "+@all",
                "resetchannels",
            ][..],
        )
        .query_async(&mut admin)
        .await?;
    let spec = RedisSpec::parse(&format!("redis://nochan:pw@127.0.0.1:{}", server.port))?;
    let store = RedisStore::open(
        RedisConn::connect(&spec).await?,
        QueueLayout::new("acl", "default", 1)?,
    )
    .await?
    .announced_through(spec);
    let now = store.now_ms().await?;
    let item = NewItem::new("a", "h", now + 60_000);
    let r = item.item_ref();
    store.enqueue(vec![item]).await?;
    store.reschedule(&r, now).await?;
    let lease = store.claim(0, 5_000).await?.expect("a free queue");
    let popped = store
        .pop(
            &lease,
            PopOptions {
                max_items: 10,
                visibility_ms: 30_000,
                lease_ttl_ms: 5_000,
                merge_window_ms: 0,
                serves: Arc::from(vec!["h".to_owned()]),
            },
        )
        .await?;
    ensure!(
        popped.item_count() == 1,
        "popped {} items",
        popped.item_count()
    );
    Ok(())
}

/// A resize sends an item back to a queue still holding the leaving copy of an
/// older move that a mover had landed elsewhere and then died before finishing.
/// The item survives, once, pending at its newest home. (The import used to drop
/// the returning copy as "already there", and the older move's finish then deleted
/// the only copy.)
#[tokio::test]
async fn an_item_moved_back_before_its_older_move_finished_is_kept() -> anyhow::Result<()> {
    use anyhow::{Context, ensure};
    use chime_shared::queue::{ItemState, NewItem, queue_for};
    use chime_tests::conformance::finish_resize;

    let server = RedisServer::start().await?;
    let redis = Arc::new(server.store("back", 2).await?);
    let store: Store = redis.clone();
    let key = (0..)
        .map(|i| format!("user:{i}"))
        .find(|k| queue_for(k, 2) == 0 && queue_for(k, 3) != 0)
        .context("no key leaves queue 0 when 2 queues grow to 3")?;
    let there = queue_for(&key, 3);
    let now = store.now_ms().await?;
    let item = NewItem::new("it", "h", now + 3_600_000).key(key);
    let r = item.item_ref();
    store.enqueue(vec![item]).await?;
    let moving = |st: &[chime_shared::queue::QueueStats]| st.iter().map(|s| s.moving).sum::<u64>();

    // 2 -> 3 queues: the item's home is `there` now. Its mover lands it there and
    // dies before queue 0 forgets it.
    let grown = store.apply_layout(3, store.layout().revision + 1).await?;
    let lease = store.claim(0, 5_000).await?.context("queue 0 is free")?;
    redis.die_after_next_landing();
    let died = store.migrate(&lease, 50).await;
    store.release(&lease).await?;
    ensure!(died.is_err(), "the injected fault did not fire: {died:?}");
    ensure!(
        moving(&store.stats().await?) == 1,
        "{:?}",
        store.stats().await?
    );

    // 3 -> 1 queue before queue 0 is looked at again: the item comes back from
    // `there` to queue 0 first, then queue 0 finishes the older move.
    store.apply_layout(1, grown.revision + 1).await?;
    let lease = store
        .claim(there, 5_000)
        .await?
        .context("its queue is free")?;
    let step = store.migrate(&lease, 50).await;
    store.release(&lease).await?;
    ensure!(step?.moved == 1, "the item did not move back");
    finish_resize(&store).await?;

    let v = store.get(&r).await?.context("the item was lost")?;
    ensure!(
        v.queue == 0 && matches!(v.state, ItemState::Pending { .. }),
        "{v:?}"
    );
    let st = store.stats().await?;
    ensure!(
        st.iter().map(|s| s.pending).sum::<u64>() == 1 && moving(&st) == 0,
        "{st:?}"
    );
    Ok(())
}
