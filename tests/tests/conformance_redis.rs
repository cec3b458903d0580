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
