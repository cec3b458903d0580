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
