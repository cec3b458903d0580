//! The delay-store conformance suite against the in-memory store (system clock).

use std::sync::Arc;

use chime_shared::clock::SystemClock;
use chime_shared::queue::memory_store::MemoryStore;
use chime_tests::conformance::{QUEUES, Store};

async fn make() -> anyhow::Result<(Store, ())> {
    Ok((
        Arc::new(MemoryStore::new(QUEUES, Arc::new(SystemClock))),
        (),
    ))
}

chime_tests::conformance_suite!(make());
