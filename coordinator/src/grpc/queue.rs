//! The delay queue over gRPC (`chime.v1.Queue`), for producers in any language:
//! enqueue, get, cancel, reschedule, counts, dead letters. Thin: each call converts
//! the request at this edge, applies the same checks and limits as every other
//! producer path (`NewItem::validate`, `validate_batch`), and calls the
//! [`DelayStore`]. Any replica answers, leader or not: items live in the store, and
//! the store follows the live queue layout by itself.

use std::sync::Arc;

use chime_shared::limits;
use chime_shared::queue::{
    CancelOutcome, DEFAULT_MAX_ATTEMPTS, DelayStore, EnqueueOutcome, ItemRef, ItemState, ItemView,
    NewItem, RescheduleOutcome, parse_traceparent, validate_batch,
};
use chime_shared::trace::{TraceContext, call_context, end_enqueue_span, enqueue_span};
use proto as pb;
use tonic::{Request, Response, Status};

use crate::audit::Audit;
use crate::error::CoordError;
use crate::scope::HandlerScope;

/// The `Queue` service over this coordinator's delay store (`None`: every call
/// answers FAILED_PRECONDITION, naming what is missing).
#[derive(Debug, Clone)]
pub struct QueueApi {
    store: Option<Arc<dyn DelayStore>>,
    /// Where dead-letter requeues are recorded (`None`: nowhere, in tests).
    audit: Option<Audit>,
    /// The tokens, for a producer token's handler scope (`HandlerScope`).
    auth: super::Auth,
}

impl QueueApi {
    /// The service over `store`, recording requeues in `audit`.
    pub fn new(store: Option<Arc<dyn DelayStore>>, audit: Option<Audit>) -> Self {
        Self {
            store,
            audit,
            auth: super::Auth::default(),
        }
    }

    /// This service, limiting producer tokens to their handlers (`scope.rs`).
    pub fn scoped_by(mut self, auth: super::Auth) -> Self {
        self.auth = auth;
        self
    }

    /// The handler scope of the caller of `req`.
    fn scope<T>(&self, req: &Request<T>) -> HandlerScope {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        HandlerScope::of(&self.auth, header)
    }

    fn store(&self) -> Result<&Arc<dyn DelayStore>, CoordError> {
        self.store.as_ref().ok_or_else(|| {
            CoordError::NotConfigured(
                "this coordinator has no delay store configured ([queue] and [redis])".into(),
            )
        })
    }
}

/// An enqueue request → checked domain items, `in_ms` resolved against the store's
/// clock `now_ms`. Every limit of every other producer path applies
/// (`validate_batch`), plus the one rule only this edge has: `due_at_ms` and `in_ms`
/// are exclusive. The first refusal names its field (`items[3].payload`).
/// `call` is the trace context items without their own get (the `Enqueue` span).
pub fn items_from_proto(
    req: pb::EnqueueRequest,
    now_ms: i64,
    call: Option<TraceContext>,
) -> Result<Vec<NewItem>, CoordError> {
    if req.items.is_empty() {
        return Err(CoordError::invalid("items", "no items"));
    }
    let mut items = Vec::with_capacity(req.items.len().min(limits::MAX_BATCH_ITEMS));
    for (index, i) in req.items.into_iter().enumerate() {
        if i.due_at_ms != 0 && i.in_ms != 0 {
            return Err(CoordError::invalid(
                format!("items[{index}].in_ms"),
                "give due_at_ms or in_ms, not both",
            ));
        }
        let due = if i.due_at_ms != 0 {
            i.due_at_ms
        } else {
            now_ms.saturating_add(i.in_ms)
        };
        let max_attempts = if i.max_attempts == 0 {
            DEFAULT_MAX_ATTEMPTS
        } else {
            i.max_attempts
        };
        let mut item = NewItem::new(i.id, i.handler, due)
            .payload(i.payload)
            .max_attempts(max_attempts);
        item.key = (!i.key.is_empty()).then_some(i.key);
        item.merge_key = (!i.merge_key.is_empty()).then_some(i.merge_key);
        item.traceparent =
            parse_traceparent(&format!("items[{index}]"), Some(&i.traceparent))?.or(call);
        items.push(item);
    }
    validate_batch(&items)?;
    Ok(items)
}

/// A proto reference → a checked domain one (an empty key means the id).
pub fn ref_from_proto(r: Option<pb::ItemRef>, field: &str) -> Result<ItemRef, CoordError> {
    let r = r.ok_or_else(|| CoordError::invalid(field, "missing"))?;
    Ok(ItemRef::checked(field, r.key, r.id)?)
}

/// A stored item → its proto view.
pub fn view_to_proto(v: ItemView) -> pb::ItemView {
    let mut out = pb::ItemView {
        id: v.item.id,
        key: v.item.key,
        handler: v.item.handler,
        due_at_ms: v.item.due_at_ms,
        payload: v.item.payload.to_vec(),
        max_attempts: v.item.max_attempts,
        merge_key: v.item.merge_key.unwrap_or_default(),
        attempts: v.item.attempt,
        queue: v.queue,
        last_error: v.last_error.unwrap_or_default(),
        ..Default::default()
    };
    match v.state {
        ItemState::Pending { due_score_ms } => {
            out.set_state(pb::ItemState::Pending);
            out.due_score_ms = due_score_ms;
        }
        ItemState::InFlight {
            deadline_ms,
            cancelled,
        } => {
            out.set_state(pb::ItemState::InFlight);
            out.deadline_ms = deadline_ms;
            out.cancelled = cancelled;
        }
        ItemState::Dead { since_ms } => {
            out.set_state(pb::ItemState::Dead);
            out.since_ms = since_ms;
        }
        ItemState::Waiting { due_score_ms } => {
            out.set_state(pb::ItemState::Waiting);
            out.due_score_ms = due_score_ms;
        }
    }
    out
}

#[tonic::async_trait]
impl pb::queue_server::Queue for QueueApi {
    async fn enqueue(
        &self,
        req: Request<pb::EnqueueRequest>,
    ) -> Result<Response<pb::EnqueueResponse>, Status> {
        let q = self.store()?;
        // The producer's trace context (`traceparent` metadata): the items join
        // it through this call's span.
        let parent = call_context(
            req.metadata()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
        );
        let scope = self.scope(&req);
        let mut span = enqueue_span(parent, "grpc");
        let now = q.now_ms().await.map_err(CoordError::from)?;
        let req = req.into_inner();
        let n = req.items.len();
        let items = items_from_proto(req, now, span.as_ref().map(|s| s.context).or(parent))?;
        scope.check_items(&items)?;
        let result = q.enqueue(items).await.map_err(CoordError::from);
        end_enqueue_span(
            span.take(),
            n,
            result.as_ref().err().map(|e| e as &dyn std::fmt::Display),
        );
        let outcomes = result?;
        Ok(Response::new(pb::EnqueueResponse {
            outcomes: outcomes
                .into_iter()
                .map(|o| match o {
                    EnqueueOutcome::Created => pb::EnqueueOutcome::Created,
                    EnqueueOutcome::Duplicate => pb::EnqueueOutcome::Duplicate,
                } as i32)
                .collect(),
        }))
    }

    async fn get_item(&self, req: Request<pb::ItemRef>) -> Result<Response<pb::ItemView>, Status> {
        let scope = self.scope(&req);
        let r = ref_from_proto(Some(req.into_inner()), "item")?;
        match self.store()?.get(&r).await.map_err(CoordError::from)? {
            Some(v) if scope.allows(&v.item.handler) => Ok(Response::new(view_to_proto(v))),
            _ => Err(CoordError::NotFound(format!("item {:?} (key {:?})", r.id, r.key)).into()),
        }
    }

    async fn cancel_item(
        &self,
        req: Request<pb::ItemRef>,
    ) -> Result<Response<pb::CancelItemResponse>, Status> {
        let scope = self.scope(&req);
        let r = ref_from_proto(Some(req.into_inner()), "item")?;
        scope.check_ref(self.store()?, &r).await?;
        let outcome = match self.store()?.cancel(&r).await.map_err(CoordError::from)? {
            CancelOutcome::Cancelled => pb::CancelOutcome::Cancelled,
            CancelOutcome::InFlight => pb::CancelOutcome::InFlight,
            CancelOutcome::NotFound => pb::CancelOutcome::NotFound,
        };
        Ok(Response::new(pb::CancelItemResponse {
            outcome: outcome as i32,
        }))
    }

    async fn reschedule_item(
        &self,
        req: Request<pb::RescheduleItemRequest>,
    ) -> Result<Response<pb::RescheduleItemResponse>, Status> {
        let scope = self.scope(&req);
        let req = req.into_inner();
        let r = ref_from_proto(req.item, "item")?;
        limits::check_due("due_at_ms", req.due_at_ms).map_err(CoordError::from)?;
        scope.check_ref(self.store()?, &r).await?;
        let outcome = match self
            .store()?
            .reschedule(&r, req.due_at_ms)
            .await
            .map_err(CoordError::from)?
        {
            RescheduleOutcome::Rescheduled => pb::RescheduleOutcome::Rescheduled,
            RescheduleOutcome::InFlight => pb::RescheduleOutcome::InFlight,
            RescheduleOutcome::Dead => pb::RescheduleOutcome::Dead,
            RescheduleOutcome::NotFound => pb::RescheduleOutcome::NotFound,
        };
        Ok(Response::new(pb::RescheduleItemResponse {
            outcome: outcome as i32,
        }))
    }

    async fn queue_stats(
        &self,
        _: Request<pb::QueueStatsRequest>,
    ) -> Result<Response<pb::QueueStatsResponse>, Status> {
        let q = self.store()?;
        let stats = q.stats().await.map_err(CoordError::from)?;
        let waiting_by_handler = q
            .waiting_by_handler()
            .await
            .map_err(CoordError::from)?
            .into_iter()
            .collect();
        Ok(Response::new(pb::QueueStatsResponse {
            waiting_by_handler,
            now_ms: q.now_ms().await.map_err(CoordError::from)?,
            count: q.layout().count,
            queues: stats
                .into_iter()
                .map(|s| pb::QueueCounts {
                    queue: s.queue,
                    pending: s.pending,
                    due_now: s.due_now,
                    due_soon: s.due_soon,
                    in_flight: s.in_flight,
                    dead: s.dead,
                    next_due_ms: s.next_due_ms.unwrap_or(0),
                    moving: s.moving,
                    waiting: s.waiting,
                })
                .collect(),
        }))
    }

    async fn list_dead_letters(
        &self,
        req: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let scope = self.scope(&req);
        let limit = match req.into_inner().limit as usize {
            0 => limits::DEFAULT_DEAD_LETTER_LIST,
            n => n.min(limits::MAX_DEAD_LETTER_LIST),
        };
        let items = scope.dead_letters(self.store()?, limit).await?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            items: items.into_iter().map(view_to_proto).collect(),
        }))
    }

    async fn requeue_dead_letters(
        &self,
        req: Request<pb::RequeueDeadLettersRequest>,
    ) -> Result<Response<pb::RequeueDeadLettersResponse>, Status> {
        let caller = super::caller_of(&req);
        let scope = self.scope(&req);
        let req = req.into_inner();
        if req.all != req.items.is_empty() {
            return Err(CoordError::invalid("items", "give either items or all: true").into());
        }
        if req.all {
            scope.check_requeue_all()?;
        }
        if req.items.len() > limits::MAX_REQUEUE_ITEMS {
            return Err(CoordError::invalid(
                "items",
                format!(
                    "{} items in one call, the limit is {}",
                    req.items.len(),
                    limits::MAX_REQUEUE_ITEMS
                ),
            )
            .into());
        }
        let refs = req
            .items
            .into_iter()
            .enumerate()
            .map(|(i, r)| ref_from_proto(Some(r), &format!("items[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        for r in &refs {
            scope.check_ref(self.store()?, r).await?;
        }
        let n = self
            .store()?
            .requeue_dead(&refs, limits::MAX_REQUEUE_ITEMS)
            .await
            .map_err(CoordError::from)?;
        if let Some(a) = &self.audit {
            a.record(&caller, vec![crate::audit::requeued(&refs, n)])
                .await;
        }
        Ok(Response::new(pb::RequeueDeadLettersResponse {
            requeued: n as u64,
        }))
    }
}
