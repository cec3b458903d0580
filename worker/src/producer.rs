//! The Rust SDK's producer: `chime.v1.Queue` over gRPC, for services that schedule
//! delayed items without linking a store (any coordinator replica answers).
//!
//! ```no_run
//! # async fn demo() -> Result<(), chime_worker::WorkerError> {
//! use chime_shared::queue::{ItemRef, NewItem};
//! use chime_worker::producer::{Producer, ProducerOptions};
//! let p = Producer::connect(ProducerOptions {
//!     endpoint: "http://coordinator:7070".into(),
//!     token: Some("producer-token-0123456789".into()),
//!     ..Default::default()
//! })
//! .await?;
//! let due = chime_shared::clock::system_now_ms() + 60_000;
//! p.enqueue(vec![NewItem::new("coupon-7:user-42", "coupon.remind", due).key("user-42")]).await?;
//! p.cancel(&ItemRef::with_key("user-42", "coupon-7:user-42")).await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use chime_shared::auth::Bearer;
use chime_shared::queue::{
    CancelOutcome, EnqueueOutcome, Item, ItemRef, ItemState, ItemView, NewItem, RescheduleOutcome,
};
use proto as pb;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

use crate::WorkerError;

/// Where the coordinators are and how to present oneself.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// A coordinator's gRPC endpoint (`http://host:7070`; any replica).
    pub endpoint: String,
    /// A producer (or admin) token.
    pub token: Option<String>,
    /// TLS for `https://` endpoints.
    pub tls: chime_shared::tls::ClientTls,
    /// Per-call timeout. Default 10 s.
    pub timeout: Duration,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:7070".into(),
            token: None,
            tls: Default::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// A `chime.v1.Queue` client (cheap to clone: one multiplexed connection).
#[derive(Debug, Clone)]
pub struct Producer {
    client: pb::queue_client::QueueClient<InterceptedService<Channel, Bearer>>,
}

/// A refused call → the error a caller acts on: a bad argument names its field.
fn refused(s: tonic::Status) -> WorkerError {
    match s.code() {
        tonic::Code::InvalidArgument => WorkerError::InvalidArgument {
            field: s
                .metadata()
                .get("chime-field")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            reason: s.message().to_owned(),
        },
        code => WorkerError::Call {
            code,
            message: s.message().to_owned(),
        },
    }
}

impl Producer {
    /// Connects (lazily: the first call dials).
    pub async fn connect(opts: ProducerOptions) -> Result<Self, WorkerError> {
        let endpoint = chime_shared::tls::endpoint(&opts.endpoint, &opts.tls, "producer.")?
            .timeout(opts.timeout)
            .connect_timeout(Duration::from_secs(3));
        let channel = endpoint.connect_lazy();
        let bearer = Bearer::new(opts.token.as_deref())?;
        Ok(Self {
            client: pb::queue_client::QueueClient::with_interceptor(channel, bearer),
        })
    }

    /// Stores items (up to 100,000 per call); one outcome per item, in order.
    /// Idempotent on the id while the item exists: a retried call creates nothing
    /// twice.
    pub async fn enqueue(&self, items: Vec<NewItem>) -> Result<Vec<EnqueueOutcome>, WorkerError> {
        let req = pb::EnqueueRequest {
            items: items
                .into_iter()
                .map(|i| pb::NewItem {
                    id: i.id,
                    key: i.key.unwrap_or_default(),
                    handler: i.handler,
                    due_at_ms: i.due_at_ms,
                    in_ms: 0,
                    payload: i.payload.into(),
                    max_attempts: i.max_attempts,
                    merge_key: i.merge_key.unwrap_or_default(),
                    traceparent: i.traceparent.map(|t| t.to_string()).unwrap_or_default(),
                })
                .collect(),
        };
        let r = self.client.clone().enqueue(req).await.map_err(refused)?;
        Ok(r.into_inner()
            .outcomes()
            .map(|o| match o {
                pb::EnqueueOutcome::Duplicate => EnqueueOutcome::Duplicate,
                _ => EnqueueOutcome::Created,
            })
            .collect())
    }

    /// An item and its state; `None` when there is no such item.
    pub async fn get(&self, item: &ItemRef) -> Result<Option<ItemView>, WorkerError> {
        match self.client.clone().get_item(ref_to_proto(item)).await {
            Ok(v) => Ok(Some(view_from_proto(v.into_inner()))),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(refused(s)),
        }
    }

    /// Cancels an item that has not fired.
    pub async fn cancel(&self, item: &ItemRef) -> Result<CancelOutcome, WorkerError> {
        let r = self
            .client
            .clone()
            .cancel_item(ref_to_proto(item))
            .await
            .map_err(refused)?;
        Ok(match r.into_inner().outcome() {
            pb::CancelOutcome::Cancelled => CancelOutcome::Cancelled,
            pb::CancelOutcome::InFlight => CancelOutcome::InFlight,
            _ => CancelOutcome::NotFound,
        })
    }

    /// Moves a pending item's due time.
    pub async fn reschedule(
        &self,
        item: &ItemRef,
        due_at_ms: i64,
    ) -> Result<RescheduleOutcome, WorkerError> {
        let r = self
            .client
            .clone()
            .reschedule_item(pb::RescheduleItemRequest {
                item: Some(ref_to_proto(item)),
                due_at_ms,
            })
            .await
            .map_err(refused)?;
        Ok(match r.into_inner().outcome() {
            pb::RescheduleOutcome::Rescheduled => RescheduleOutcome::Rescheduled,
            pb::RescheduleOutcome::InFlight => RescheduleOutcome::InFlight,
            pb::RescheduleOutcome::Dead => RescheduleOutcome::Dead,
            _ => RescheduleOutcome::NotFound,
        })
    }

    /// Queue counts, as the coordinator answers them.
    pub async fn stats(&self) -> Result<pb::QueueStatsResponse, WorkerError> {
        let r = self
            .client
            .clone()
            .queue_stats(pb::QueueStatsRequest {})
            .await
            .map_err(refused)?;
        Ok(r.into_inner())
    }
}

fn ref_to_proto(r: &ItemRef) -> pb::ItemRef {
    pb::ItemRef {
        key: r.key.clone(),
        id: r.id.clone(),
    }
}

fn view_from_proto(v: pb::ItemView) -> ItemView {
    let state = match v.state() {
        pb::ItemState::InFlight => ItemState::InFlight {
            deadline_ms: v.deadline_ms,
            cancelled: v.cancelled,
        },
        pb::ItemState::Dead => ItemState::Dead {
            since_ms: v.since_ms,
        },
        pb::ItemState::Waiting => ItemState::Waiting {
            due_score_ms: v.due_score_ms,
        },
        pb::ItemState::Pending | pb::ItemState::Unspecified => ItemState::Pending {
            due_score_ms: v.due_score_ms,
        },
    };
    ItemView {
        item: Item {
            id: v.id,
            key: v.key,
            handler: v.handler,
            due_at_ms: v.due_at_ms,
            payload: v.payload.into(),
            max_attempts: v.max_attempts,
            merge_key: (!v.merge_key.is_empty()).then_some(v.merge_key),
            attempt: v.attempts,
            traceparent: None,
        },
        queue: v.queue,
        state,
        last_error: (!v.last_error.is_empty()).then_some(v.last_error),
    }
}
