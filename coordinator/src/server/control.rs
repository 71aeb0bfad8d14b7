//! `Control`: workers joining.
use tonic::{Request, Response, Status};
use zeroshard_proto::v1 as pb;

use super::Coordinator;

pub struct ControlSvc(pub Coordinator);

#[tonic::async_trait]
impl zeroshard_proto::v1::control_server::Control for ControlSvc {
    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let r = req.into_inner();
        if r.address.is_empty() {
            return Err(Status::invalid_argument("RegisterWorker: address is empty"));
        }
        let id = self.0.register(r.address).map_err(|e| Status::failed_precondition(e.to_string()))?;
        let inner = &self.0 .0;
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: id.0,
            model_dir: inner.cfg.model_dir.display().to_string(),
            config_json: inner.config_json.clone(),
            generation_config_json: inner.generation_config_json.clone(),
        }))
    }
}
