//! `Control`: workers joining an embedded-membership coordinator, and their
//! lease renewals. Under etcd workers register there instead.
use tonic::{Request, Response, Status};
use zeroshard_offload::plan::WorkerId;
use zeroshard_proto::v1 as pb;
use zeroshard_security::auth::caller_of;
use zeroshard_security::{Address, Caller};

use super::Coordinator;
use crate::error::CoordinatorError;
use crate::membership::embedded::{EmbeddedMembership, Refusal};
use crate::membership::Membership;

pub(super) struct ControlSvc(pub Coordinator);

/// PERMISSION_DENIED unless `caller` registered `id` (or it was registered
/// without TLS).
fn check_owner(m: &EmbeddedMembership, id: WorkerId, caller: &Caller) -> Result<(), Status> {
    let key = caller.credential().map(|c| c.key);
    if m.owned_by(id, key) {
        return Ok(());
    }
    let holder = m.owner(id).map_or_else(|| "another identity".into(), |h| h.to_string());
    let by = caller.credential().map_or_else(|| "an anonymous caller".into(), |c| c.to_string());
    Err(Status::permission_denied(format!("{id} was registered by {holder}; {by} may not act for it")))
}

impl ControlSvc {
    fn embedded(&self) -> Result<&EmbeddedMembership, CoordinatorError> {
        self.0.embedded().ok_or_else(|| {
            CoordinatorError::Precondition(format!(
                "this coordinator's membership is {}: start workers with the same --etcd and --cluster",
                self.0.membership().describe()
            ))
        })
    }
}

#[tonic::async_trait]
impl zeroshard_proto::v1::control_server::Control for ControlSvc {
    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let caller = caller_of(&req);
        let r = req.into_inner();
        let security = &self.0.cfg().security;
        let address = Address::parse(&r.address)
            .map_err(|e| CoordinatorError::InvalidRequest(format!("RegisterWorker: {e}")))?;
        if address.tls != security.is_tls() {
            return Err(CoordinatorError::InvalidRequest(format!(
                "RegisterWorker: address {} must be {}:// in this cluster",
                r.address,
                security.scheme()
            ))
            .into());
        }
        let m = self.embedded()?;
        let prior = (r.worker_id != 0).then_some(WorkerId(r.worker_id));
        let owner = caller.credential();
        let id = m.register(address.uri(), r.device, r.memory_bytes, prior, owner).map_err(|refusal| {
            let why = format!("RegisterWorker: {}", refusal.describe(owner));
            tracing::warn!("refused: {why}");
            match refusal {
                Refusal::TooOften => Status::resource_exhausted(why),
                _ => Status::permission_denied(why),
            }
        })?;
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: id.0,
            model: Some(super::worker_client::model_info(&self.0)),
            lease_ttl_ms: m.lease_ttl().as_millis() as u64,
        }))
    }

    async fn keep_alive(
        &self,
        req: Request<pb::KeepAliveRequest>,
    ) -> Result<Response<pb::KeepAliveResponse>, Status> {
        let caller = caller_of(&req);
        let id = WorkerId(req.into_inner().worker_id);
        let m = self.embedded()?;
        check_owner(m, id, &caller)?;
        let known = m.keep_alive(id);
        Ok(Response::new(pb::KeepAliveResponse { known }))
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let caller = caller_of(&req);
        let r = req.into_inner();
        let m = self.embedded()?;
        check_owner(m, WorkerId(r.worker_id), &caller)?;
        // A member that says it leaves is doing what it was told.
        tracing::info!("worker {} leaves: {}", r.worker_id, r.reason);
        m.evict(WorkerId(r.worker_id)).await.map_err(CoordinatorError::from)?;
        Ok(Response::new(pb::LeaveResponse {}))
    }
}
