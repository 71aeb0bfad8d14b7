//! The gRPC front: [`serve`] puts the coordinator's services on one socket
//! (each behind its role check), and `Inference`, the client API, converts at
//! its edge: a `GenerateRequest` message becomes the domain request
//! [`generate::start`] runs, and its chunks and error go back as messages and
//! a status.
use std::future::Future;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use zeroshard_proto::v1 as pb;
use zeroshard_proto::v1::control_server::ControlServer;
use zeroshard_proto::v1::inference_server::InferenceServer;
use zeroshard_proto::v1::shards_server::ShardsServer;
use zeroshard_security::{Guard, Role};

use super::{control, generate, shards, Coordinator, Readiness};
use crate::error::{CoordinatorError, Result};
use crate::request::GenerateRequest;

/// Serves the coordinator's services on `listener` until `shutdown`.
pub async fn serve(
    coord: Coordinator,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut ready = coord.readiness();
    let watch_health = async move {
        health.set_not_serving::<InferenceServer<InferenceSvc>>().await;
        loop {
            if matches!(*ready.borrow(), Readiness::Ready) {
                health.set_serving::<InferenceServer<InferenceSvc>>().await;
            }
            if ready.changed().await.is_err() {
                break;
            }
        }
    };
    tokio::spawn(watch_health);
    let security = coord.cfg().security.clone();
    let tls = security.is_tls();
    let router = zeroshard_proto::transport::server()
        .add_service(health_service)
        .add_service(InterceptedService::new(
            InferenceServer::new(InferenceSvc(coord.clone())),
            Guard::clients(tls, "Inference", coord.cfg().api_keys.clone()).revoking(&security),
        ))
        .add_service(InterceptedService::new(
            ControlServer::new(control::ControlSvc(coord.clone())),
            Guard::members(tls, "Control", &[Role::Worker]).revoking(&security),
        ))
        .add_service(InterceptedService::new(
            ShardsServer::new(shards::CheckpointShards(coord)),
            Guard::members(tls, "Shards", &[Role::Coordinator, Role::Worker]).revoking(&security),
        ));
    security.spawn_reloader();
    security
        .serve(router, listener, shutdown)
        .await
        .map_err(|e| CoordinatorError::Unavailable(format!("coordinator server: {e}")))
}

#[derive(Clone)]
struct InferenceSvc(Coordinator);

type ChunkStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl zeroshard_proto::v1::inference_server::Inference for InferenceSvc {
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> std::result::Result<Response<pb::GenerateResponse>, Status> {
        let mut chunks = generate::start(&self.0, GenerateRequest::try_from(req.into_inner()));
        let mut resp = pb::GenerateResponse::default();
        while let Some(chunk) = chunks.recv().await {
            let c = pb::GenerateChunk::from(chunk?);
            if !c.prompt_token_ids.is_empty() {
                resp.prompt_token_ids = c.prompt_token_ids;
            }
            resp.token_ids.extend(c.token_ids);
            resp.text.push_str(&c.text);
            if c.finish_reason != 0 {
                resp.finish_reason = c.finish_reason;
                resp.timings = c.timings;
            }
        }
        if resp.finish_reason == 0 {
            return Err(
                CoordinatorError::Unavailable("the sequence ended without a finish reason".into()).into()
            );
        }
        Ok(Response::new(resp))
    }

    type GenerateStreamStream = ChunkStream;

    /// The request's chunks are the response body as they come (no task or
    /// channel of its own: dropping the body drops the receiver, which ends
    /// the request).
    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> std::result::Result<Response<ChunkStream>, Status> {
        let chunks = generate::start(&self.0, GenerateRequest::try_from(req.into_inner()));
        let messages = tokio_stream::wrappers::ReceiverStream::new(chunks)
            .map(|c| c.map(pb::GenerateChunk::from).map_err(Status::from));
        Ok(Response::new(Box::pin(messages)))
    }

    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> std::result::Result<Response<pb::ClusterStatusResponse>, Status> {
        Ok(Response::new(self.0.status().await.into()))
    }
}
