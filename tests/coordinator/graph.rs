//! Flow edges and findings that agents report reach the fleet graph (`interlock graph`) and
//! the findings view (`interlock findings`).

use interlock_proto::v1 as pb;
use interlock_tests::{ADMIN, client};

use super::{agent_for, fixture, policy, register_hosts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_flows_and_findings_show_in_the_graph_and_findings_views() {
    let f = fixture("graph", &policy("2", "autonomous", 10, 10, "30s"), "60s").await;
    register_hosts(&f.coordinator, "g", "checkout", 1).await;
    let mut agent = agent_for(&f.coordinator, "g00").await;
    let edge = pb::FlowEdge {
        local_service: String::new(),
        process: "java".into(),
        remote: "127.0.0.1:5432".into(),
        connects_per_s: 12.5,
        failures_per_s: 0.5,
        retransmits_per_s: 0.0,
        bytes_per_s: 2048.0,
    };
    let accepted = agent
        .report_flows(pb::ReportFlowsRequest {
            host_id: "g00".into(),
            edges: vec![edge],
        })
        .await
        .expect("report flows")
        .into_inner()
        .accepted;
    assert_eq!(accepted, 1);
    agent
        .report_findings(pb::ReportFindingsRequest {
            host_id: "g00".into(),
            findings: vec![pb::Finding {
                id: "disk_full//data".into(),
                detector: "disk_full".into(),
                target: "/data".into(),
                summary: "/data is 93% used".into(),
                evidence_json: r#"{"used_ratio":0.93}"#.into(),
                since_ms: 1,
            }],
        })
        .await
        .expect("report findings");

    let run = |args: &[&str]| {
        let out = f
            .coordinator
            .cli(ADMIN)
            .args(args)
            .output()
            .expect("run interlock");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let graph: serde_json::Value = serde_json::from_str(&run(&["-o", "json", "graph"])).unwrap();
    let edges = graph["edges"].as_array().expect("edges");
    assert_eq!(edges.len(), 1);
    assert_eq!(
        edges[0]["from_service"], "checkout",
        "the host's service label"
    );
    assert_eq!(edges[0]["to"], "127.0.0.1:5432");
    assert_eq!(edges[0]["failures_per_s"], 0.5);
    let dot = run(&["-o", "dot", "graph"]);
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(
        dot.contains("\"checkout\" -> \"127.0.0.1:5432\"") && dot.contains("color=red"),
        "{dot}"
    );

    let findings: serde_json::Value =
        serde_json::from_str(&run(&["-o", "json", "findings", "--host", "g00"])).unwrap();
    assert_eq!(findings["findings"][0]["detector"], "disk_full");
    let hosts = client::operator(&f.admin)
        .hosts(pb::HostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(hosts[0].findings, 1, "the host view counts its findings");

    // A report for another host is refused (the host is the certificate's; the empty-host-id
    // check of an --insecure coordinator is in bad_input); the coordinator keeps serving.
    let err = agent
        .report_flows(pb::ReportFlowsRequest {
            host_id: "g01".into(),
            edges: vec![],
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    client::operator(&f.admin)
        .status(pb::StatusRequest {})
        .await
        .expect("still serving");
}
