//! The gRPC server: binds the services to a listener and runs until shutdown.
//!
//! Owns the tonic plumbing only; it converts wire types at the boundary and must not hold
//! decision logic.

use std::future::Future;

use interlock_proto::v1::{
    PingReply, PingRequest,
    coordinator_server::{Coordinator, CoordinatorServer},
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// What the server needs to know about itself.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// "etcd" or "embedded": reported by `Ping` and `interlock status`.
    pub store_kind: &'static str,
}

#[derive(Debug)]
struct CoordinatorService {
    config: ServerConfig,
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        let PingRequest { caller } = request.into_inner();
        if caller.len() > 256 {
            return Err(Status::invalid_argument(
                "caller is longer than 256 bytes; send a host id or operator name",
            ));
        }
        Ok(Response::new(PingReply {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            store: self.config.store_kind.to_owned(),
            caller,
        }))
    }
}

/// Serves the coordinator API on `listener` until `shutdown` resolves, then drains in-flight
/// requests and returns.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tracing::info!(addr = ?listener.local_addr().ok(), store = config.store_kind, "coordinator serving");
    tonic::transport::Server::builder()
        .add_service(CoordinatorServer::new(CoordinatorService { config }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
