//! `Control`: workers joining an embedded-membership coordinator, and their
//! lease renewals. Under etcd workers register there instead.
use tonic::{Request, Response, Status};
use zeroshard_offload::plan::WorkerId;
use zeroshard_proto::v1 as pb;

use super::Coordinator;
use crate::error::CoordinatorError;
use crate::membership::embedded::EmbeddedMembership;
use crate::membership::Membership;

pub(super) struct ControlSvc(pub Coordinator);

impl ControlSvc {
    fn embedded(&self) -> Result<&EmbeddedMembership, CoordinatorError> {
        self.0.embedded().ok_or_else(|| {
            CoordinatorError::Precondition(format!(
                "this coordinator's membership is {}: start workers with the same --etcd and --cluster",
                self.0 .0.membership.describe()
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
        let r = req.into_inner();
        if r.address.is_empty() {
            return Err(CoordinatorError::InvalidRequest("RegisterWorker: address is empty".into()).into());
        }
        let m = self.embedded()?;
        let prior = (r.worker_id != 0).then_some(WorkerId(r.worker_id));
        let id = m.register(r.address, r.device, r.memory_bytes, prior);
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
        let known = self.embedded()?.keep_alive(WorkerId(req.into_inner().worker_id));
        Ok(Response::new(pb::KeepAliveResponse { known }))
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let r = req.into_inner();
        let m = self.embedded()?;
        tracing::warn!("worker {} leaves: {}", r.worker_id, r.reason);
        m.evict(WorkerId(r.worker_id)).await.map_err(CoordinatorError::from)?;
        Ok(Response::new(pb::LeaveResponse {}))
    }
}
