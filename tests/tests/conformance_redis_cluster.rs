//! The delay-store conformance suite against a real 3-master Redis Cluster started
//! for each test: queues spread over the masters by their hash tags, every script on
//! one slot, the client following the slot map.

use std::sync::Arc;

use chime_shared::queue::QueueLayout;
use chime_shared::queue::redis_store::RedisStore;
use chime_shared::redis_conn::{RedisConn, RedisSpec};
use chime_tests::RedisCluster;
use chime_tests::conformance::{QUEUES, Store};

async fn make() -> anyhow::Result<(Store, RedisCluster)> {
    let cluster = RedisCluster::start(3, 0).await?;
    let spec = RedisSpec::parse(&cluster.seeds)?;
    let conn = RedisConn::connect(&spec).await?;
    let store = RedisStore::open(conn, QueueLayout::new("conf", "default", QUEUES)?)
        .await?
        .announced_through(spec);
    Ok((Arc::new(store), cluster))
}

chime_tests::conformance_suite!(make());
