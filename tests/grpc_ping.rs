//! The gRPC chain: the coordinator library serves (embedded store) on 127.0.0.1:0 and a
//! generated client calls it.

use std::time::Duration;

use interlock_coordinator::serve::{self, ServeOptions, StoreChoice};
use interlock_proto::v1::{PingRequest, coordinator_client::CoordinatorClient};
use tokio::sync::oneshot;

#[tokio::test]
async fn a_client_pings_the_coordinator_and_bad_input_is_refused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let options = ServeOptions {
        store: StoreChoice::Embedded(None),
        policy_name: "basic.toml".into(),
        policy_text: interlock_tests::BASIC_POLICY.into(),
        prefix: "/ping".into(),
        advertise: None,
        host_ttl: Duration::from_secs(10),
        election_ttl: Duration::from_secs(2),
        failpoint_pause_before_grant_commit: None,
        audit_retention: 100_000,
        // Insecure on purpose: this checks the caller name the message claims, which only an
        // insecure server believes (over mutual TLS the certificate's identity replaces it, so
        // there is nothing to refuse); the mTLS path is every other coordinator test.
        security: interlock_coordinator::tls::Security::Insecure,
    };
    let server = tokio::spawn(serve::run(options, listener, None, async {
        let _ = stopped.await;
    }));
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
