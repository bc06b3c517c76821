//! weft's end-to-end test harness: pods as Linux network namespaces on a bridge, real
//! iptables (`weft-proxy init`), real proxies and control plane, packet captures, and the
//! `weft-testapp` and `weft-httpapp` test applications. Tests usually start with [`e2e_test`].

pub mod apps;
pub mod bins;
pub mod capture;
pub mod cluster;
pub mod error;
pub mod grpcapp;
pub mod h1;
pub mod http;
pub mod httpapp;
pub mod kube;
pub mod kubelet;
pub mod load;
pub mod manifests;
pub mod mesh;
pub mod meshtls;
pub mod metrics;
pub mod netns;
pub mod otlp;
pub mod prereqs;
pub mod proc;
pub mod procstat;
pub mod prometheus;
pub mod testapp;
pub mod wait;
pub mod webhook;

pub use apps::{client_summary, run_client, spawn_client, start_server, ServerKind};
pub use bins::bin;
pub use capture::{Capture, Captured, TcpSegment};
pub use cluster::{Cluster, Pod, NODE_IP};
pub use error::{HarnessError, Result};
pub use http::HttpResponse;
pub use manifests::Manifests;
pub use mesh::{spiffe_id, spiffe_id_in, IdentityFiles, MeshPod, MeshPodSpec, PROXY_UID};
pub use meshtls::{MeshTlsStream, WorkloadCert};
pub use metrics::MetricsSnapshot;
pub use netns::{in_netns, Netns};
pub use prereqs::Prereqs;
pub use proc::{Cmd, Proc, SIGINT, SIGKILL, SIGTERM};
pub use testapp::ClientSummary;
pub use wait::{wait_for, wait_until};

/// Tools every namespace test needs.
pub const BASE_TOOLS: &[&str] = &["ip", "setpriv"];
/// Tools a meshed-pod test needs in addition (the proxy's init writes rules with
/// iptables-restore; captures use tcpdump).
pub const MESH_TOOLS: &[&str] = &["ip", "setpriv", "iptables-nft-restore", "tcpdump"];

/// Runs one end-to-end test: checks root and `tools` (skipping, or failing under `CI=true`),
/// builds a fresh [`Cluster`], and runs `body` in it. An `Err` from `body` fails the test while
/// the cluster is still alive, so the failure report includes every process's logs; the
/// cluster is torn down afterwards either way.
pub fn e2e_test<E: std::fmt::Debug>(
    test: &str,
    tools: &[&str],
    body: impl FnOnce(&Cluster) -> std::result::Result<(), E>,
) {
    if Prereqs::require(test, tools).is_none() {
        return;
    }
    let cluster = match Cluster::new(test) {
        Ok(cluster) => cluster,
        Err(e) => panic!("{test}: setting up the cluster failed: {e}"),
    };
    if let Err(e) = body(&cluster) {
        panic!("{test} failed: {e:?}");
    }
    drop(cluster);
}
