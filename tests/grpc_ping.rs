//! The gRPC chain: the coordinator library serves on 127.0.0.1:0 and a generated client calls it.

use interlock_coordinator::server::{self, ServerConfig};
use interlock_proto::v1::{PingRequest, coordinator_client::CoordinatorClient};
use tokio::sync::oneshot;

#[tokio::test]
async fn a_client_pings_the_coordinator_and_bad_input_is_refused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server::run(
        listener,
        ServerConfig {
            store_kind: "embedded",
        },
        async {
            let _ = stopped.await;
        },
    ));
    let mut client = CoordinatorClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let reply = client
        .ping(PingRequest {
            caller: "grpc-test".into(),
        })
        .await
        .expect("ping")
        .into_inner();
    assert_eq!(reply.caller, "grpc-test");
    assert_eq!(reply.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(reply.store, "embedded");

    let refused = client
        .ping(PingRequest {
            caller: "x".repeat(300),
        })
        .await
        .expect_err("an oversized caller is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("256 bytes"), "{refused}");

    stop.send(()).unwrap();
    server.await.unwrap().expect("server shuts down cleanly");
}
