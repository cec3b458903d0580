//! The one edge between `chime.v1.Deliveries` messages and domain values: both the
//! worker's server and the Rust subscriber convert here and nowhere else.

use chime_shared::queue::Item;
use proto as pb;

use super::{MAX_ERROR_BYTES, MAX_RETRY_AFTER_MS, OutDelivery, SubscribeSpec, Verdict, cut};

/// A `Subscribe` message → what it asks for (validated by [`SubscribeSpec::validate`]);
/// an empty subscriber name becomes `peer`.
pub fn spec_from_proto(s: pb::Subscribe, peer: String) -> SubscribeSpec {
    SubscribeSpec {
        handlers: s.handlers,
        credit: s.credit,
        name: if s.subscriber.is_empty() {
            peer
        } else {
            s.subscriber
        },
        settle_timeout_ms: s.settle_timeout_ms,
    }
}

/// A `Settle` message → (delivery id, verdict) pairs, errors cut and retry delays
/// capped (a bound, not a refusal: the verdict still counts).
pub fn verdicts_from_proto(s: pb::Settle) -> Vec<(u64, Verdict)> {
    let mut out = Vec::with_capacity(s.acks.len() + s.failures.len() + s.releases.len());
    out.extend(s.acks.into_iter().map(|id| (id, Verdict::Ack)));
    out.extend(s.failures.into_iter().map(|f| {
        (
            f.delivery_id,
            Verdict::Fail {
                error: cut(f.error, MAX_ERROR_BYTES),
                retry_after_ms: f.retry_after_ms.map(|ms| ms.min(MAX_RETRY_AFTER_MS)),
            },
        )
    }));
    out.extend(s.releases.into_iter().map(|id| (id, Verdict::Release)));
    out
}

/// Verdicts → one `Settle` message.
pub fn settle_to_proto(verdicts: Vec<(u64, Verdict)>) -> pb::Settle {
    let mut s = pb::Settle::default();
    for (id, v) in verdicts {
        match v {
            Verdict::Ack => s.acks.push(id),
            Verdict::Release => s.releases.push(id),
            Verdict::Fail {
                error,
                retry_after_ms,
            } => s.failures.push(pb::Failure {
                delivery_id: id,
                error,
                retry_after_ms,
            }),
        }
    }
    s
}

/// A delivery on its way out → its message.
pub fn delivery_to_proto(d: OutDelivery) -> pb::Delivery {
    pb::Delivery {
        delivery_id: d.id,
        handler: d.handler,
        queue: d.queue,
        settle_deadline_ms: d.settle_deadline_ms,
        traceparent: d.traceparent.map(|t| t.to_string()).unwrap_or_default(),
        items: d
            .items
            .into_iter()
            .map(|i| pb::DeliveredItem {
                id: i.id,
                key: i.key,
                due_at_ms: i.due_at_ms,
                payload: i.payload,
                attempt: i.attempt,
                max_attempts: i.max_attempts,
                merge_key: i.merge_key.unwrap_or_default(),
            })
            .collect(),
    }
}

/// A delivered item → the item a handler sees.
pub fn item_from_proto(handler: &str, i: pb::DeliveredItem) -> Item {
    Item {
        id: i.id,
        key: i.key,
        handler: handler.to_owned(),
        due_at_ms: i.due_at_ms,
        payload: i.payload,
        max_attempts: i.max_attempts,
        merge_key: (!i.merge_key.is_empty()).then_some(i.merge_key),
        attempt: i.attempt,
        // The producer's context stays with the chime worker; the app joins the
        // worker's span (`Delivery.traceparent`).
        traceparent: None,
    }
}

/// The wire size of a delivery, roughly: what the writer batches by.
pub fn approx_bytes(d: &OutDelivery) -> usize {
    d.items
        .iter()
        .map(|i| 32 + i.id.len() + i.key.len() + i.payload.len())
        .sum::<usize>()
        + d.handler.len()
}
