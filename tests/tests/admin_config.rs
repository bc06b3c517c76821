//! The proxy admin `GET /config` endpoint: after a meshed client calls a Service routed by
//! an HTTPRoute, the client proxy's `/config` shows the target with its routes, weighted
//! backends and endpoint identities; the server proxy's shows its inbound port with the
//! AuthorizationPolicies in force, following a live change; other methods get 405.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use serde_json::Value;
use weft_e2e::http::parse_response;
use weft_e2e::httpapp::start_http_server;
use weft_e2e::load::{run_load_blocking, LoadConfig};
use weft_e2e::manifests::{
    AuthorizationPolicySpec, PolicyRule, PolicySource, PolicyTarget, RouteRule,
};
use weft_e2e::{e2e_test, spiffe_id, wait_for, MeshPod, MeshPodSpec, MESH_TOOLS};

const NS: &str = "shop";
const APP_PORT: u16 = 8080;
const SVC_PORT: u16 = 80;
const ADMIN_PORT: u16 = 7191;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CONFIG_TIMEOUT: Duration = Duration::from_secs(30);

fn cluster_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, last)
}

/// `/config` parsed; fails unless it is a 200 with a JSON body.
fn config(pod: &MeshPod) -> anyhow::Result<Value> {
    let rsp = pod.admin_get("/config")?;
    ensure!(
        rsp.status == 200,
        "/config on {}: status {}: {}",
        pod.name(),
        rsp.status,
        rsp.body_text()
    );
    let content_type = rsp
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.as_str());
    ensure!(
        content_type == Some("application/json"),
        "/config content type {content_type:?}"
    );
    serde_json::from_slice(&rsp.body).context("/config is not valid JSON")
}

fn outbound_target<'a>(config: &'a Value, target: &str) -> Option<&'a Value> {
    config["outbound"]
        .as_array()?
        .iter()
        .find(|t| t["target"] == target)
}

fn inbound_port(config: &Value, port: u16) -> Option<&Value> {
    config["inbound"]
        .as_array()?
        .iter()
        .find(|p| p["port"] == port)
}

fn authorization_names(port: &Value) -> Vec<String> {
    port["authorizations"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A raw HTTP/1.1 request to the admin port from the node (not loopback); the status.
fn admin_status(pod: &MeshPod, method: &str, path: &str) -> anyhow::Result<u16> {
    let addr = SocketAddr::from((pod.pod().ip(), ADMIN_PORT));
    let mut tcp = pod.pod().node().connect(addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw)?;
    Ok(parse_response(&raw)?.status)
}

#[test]
fn config_shows_routes_endpoint_identities_and_inbound_policy() {
    e2e_test(
        "admin_config",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let m = cluster.manifests();
            m.namespace(NS, false)?;
            m.service(
                NS,
                "web",
                cluster_ip(10),
                &[("group", "web")],
                SVC_PORT,
                APP_PORT,
            )?;
            m.service(
                NS,
                "web-v1",
                cluster_ip(11),
                &[("app", "web-v1")],
                SVC_PORT,
                APP_PORT,
            )?;
            m.service(
                NS,
                "web-v2",
                cluster_ip(12),
                &[("app", "web-v2")],
                SVC_PORT,
                APP_PORT,
            )?;
            m.http_route(
                NS,
                "web-routes",
                "web",
                &[],
                &[
                    RouteRule::path_prefix("/api", "web-v1", SVC_PORT)
                        .request_timeout("3s")
                        .retry(&[503], 2, Some("20ms")),
                    RouteRule::to_backends(&[("web-v1", SVC_PORT, 90), ("web-v2", SVC_PORT, 10)]),
                ],
            )?;
            m.authorization_policy(
                NS,
                "web-v1-from-client",
                &AuthorizationPolicySpec::allow(&[("app", "web-v1")])
                    .ports(&[APP_PORT])
                    .rule(
                        PolicyRule::new().from(PolicySource::service_accounts(&["shop/client-sa"])),
                    ),
            )?;
            let _control_plane = cluster.start_control_plane(&[])?;
            let mut v1 = cluster.add_mesh_pod(MeshPodSpec::new("web-v1", 21, NS, "web-v1-sa"))?;
            m.add_pod_labels(NS, "web-v1", &[("group", "web")])?;
            let mut v2 = cluster.add_mesh_pod(MeshPodSpec::new("web-v2", 22, NS, "web-v2-sa"))?;
            m.add_pod_labels(NS, "web-v2", &[("group", "web")])?;
            let _apps = [
                start_http_server(&v1, "web-v1", APP_PORT, &[])?,
                start_http_server(&v2, "web-v2", APP_PORT, &[])?,
            ];
            let mut client =
                cluster.add_mesh_pod(MeshPodSpec::new("client", 10, NS, "client-sa"))?;
            for pod in [&mut v1, &mut v2, &mut client] {
                pod.wait_ready(READY_TIMEOUT)?;
            }

            // Until the client calls the Service, its proxy holds nothing for it.
            let before = config(&client)?;
            let target = format!("{}:{SVC_PORT}", cluster_ip(10));
            ensure!(
                outbound_target(&before, &target).is_none(),
                "{target} listed before any call: {before:#}"
            );

            let url = format!("http://{target}/api/items");
            let deadline = Instant::now() + CONFIG_TIMEOUT;
            loop {
                let mut get = LoadConfig::get(&url, 1, 1);
                get.timeout = Duration::from_secs(5);
                let report = client.pod().in_netns(|| run_load_blocking(&get))??;
                if report.served_by_count("web-v1") == 1 {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "GET {url} never reached web-v1: {report:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }

            let cfg = config(&client)?;
            ensure!(cfg["identity"]["spiffe_id"] == client.identity(), "{cfg:#}");
            ensure!(cfg["identity"]["certificate"] == true, "{cfg:#}");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let expiry = cfg["identity"]["cert_expiry_unix"].as_u64().unwrap_or(0);
            ensure!(
                expiry > now,
                "certificate expiry {expiry} not after now {now}"
            );
            ensure!(cfg["control_plane"]["connected"] == true, "{cfg:#}");
            ensure!(cfg["truncated"] == false, "{cfg:#}");
            let t = outbound_target(&cfg, &target)
                .with_context(|| format!("{target} missing from /config: {cfg:#}"))?;
            ensure!(t["state"] == "resolved" && t["known"] == true, "{t:#}");
            ensure!(t["service"] == "web.shop", "{t:#}");
            ensure!(
                t["last_update_unix"].as_u64().is_some_and(|u| u <= now + 1),
                "{t:#}"
            );
            let routes = t["routes"].as_array().context("routes")?;
            ensure!(routes.len() == 2, "two rules, two routes: {t:#}");
            let (api, split) = (&routes[0], &routes[1]);
            for r in routes {
                ensure!(
                    r["name"].as_str().is_some_and(|n| n.contains("web-routes")),
                    "route name: {r:#}"
                );
                ensure!(r["default"] == false, "{r:#}");
            }
            ensure!(
                api["matches"] == serde_json::json!([{"path": {"prefix": "/api"}}]),
                "{api:#}"
            );
            ensure!(api["timeouts"]["request_ms"] == 3000, "{api:#}");
            ensure!(api["retry"]["codes"] == serde_json::json!([503]), "{api:#}");
            ensure!(api["retry"]["max_attempts"] == 3, "{api:#}");
            ensure!(api["retry"]["backoff_ms"] == 20, "{api:#}");
            ensure!(split["retry"].is_null(), "{split:#}");
            let v1_endpoint = serde_json::json!({
                "addr": format!("{}:{APP_PORT}", v1.pod().ip()),
                "identity": spiffe_id(NS, "web-v1-sa"),
            });
            let v2_endpoint = serde_json::json!({
                "addr": format!("{}:{APP_PORT}", v2.pod().ip()),
                "identity": spiffe_id(NS, "web-v2-sa"),
            });
            ensure!(
                api["backends"]
                    == serde_json::json!([
                        {"name": "web-v1.shop", "weight": 1, "endpoints": [v1_endpoint.clone()]}
                    ]),
                "{api:#}"
            );
            ensure!(
                split["backends"]
                    == serde_json::json!([
                        {"name": "web-v1.shop", "weight": 90, "endpoints": [v1_endpoint.clone()]},
                        {"name": "web-v2.shop", "weight": 10, "endpoints": [v2_endpoint.clone()]},
                    ]),
                "{split:#}"
            );
            let mut own = t["endpoints"].as_array().context("endpoints")?.clone();
            own.sort_by_key(|e| e["addr"].to_string());
            ensure!(own == [v1_endpoint, v2_endpoint], "{t:#}");
            // Nothing secret: no PEM block, no key material.
            let raw = client.admin_get("/config")?.body_text();
            ensure!(
                !raw.contains("PRIVATE KEY") && !raw.contains("-----BEGIN"),
                "{raw}"
            );

            // web-v1's proxy watched its port when the request arrived; the ALLOW is in force.
            let cfg = config(&v1)?;
            let port = inbound_port(&cfg, APP_PORT).with_context(|| {
                format!("port {APP_PORT} missing from web-v1's /config: {cfg:#}")
            })?;
            ensure!(port["state"] == "active", "{port:#}");
            ensure!(port["default_policy"] == "all-unauthenticated", "{port:#}");
            ensure!(
                authorization_names(port) == ["shop/web-v1-from-client"],
                "{port:#}"
            );
            let allow = &port["authorizations"][0];
            ensure!(allow["action"] == "allow", "{allow:#}");
            ensure!(
                allow["rules"][0]["from"][0]["service_accounts"]
                    == serde_json::json!(["shop/client-sa"]),
                "{allow:#}"
            );
            let first_update = port["last_update_unix"]
                .as_u64()
                .context("last_update_unix")?;

            // A policy written now reaches the view as soon as it reaches the proxy.
            m.authorization_policy(
                NS,
                "web-v1-no-admin",
                &AuthorizationPolicySpec::deny(&[("app", "web-v1")])
                    .ports(&[APP_PORT])
                    .rule(PolicyRule::new().to(PolicyTarget::paths(&["/admin/*"]))),
            )?;
            let mut last = Value::Null;
            let shown = wait_for(
                "the DENY policy in web-v1's /config",
                CONFIG_TIMEOUT,
                || {
                    last = config(&v1).unwrap_or(Value::Null);
                    inbound_port(&last, APP_PORT).is_some_and(|p| authorization_names(p).len() == 2)
                },
            );
            ensure!(shown.is_ok(), "DENY never shown: {last:#}");
            let port = inbound_port(&last, APP_PORT).context("port")?;
            let deny = port["authorizations"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["name"] == "shop/web-v1-no-admin"))
                .with_context(|| format!("{port:#}"))?;
            ensure!(deny["action"] == "deny", "{deny:#}");
            ensure!(
                deny["rules"][0]["to"][0]["paths"] == serde_json::json!(["/admin/*"]),
                "{deny:#}"
            );
            ensure!(
                port["last_update_unix"]
                    .as_u64()
                    .is_some_and(|u| u >= first_update),
                "{port:#}"
            );

            // Only GET reads it.
            for method in ["POST", "PUT", "DELETE"] {
                let status = admin_status(&client, method, "/config")?;
                ensure!(status == 405, "{method} /config answered {status}");
            }
            ensure!(
                admin_status(&client, "GET", "/config")? == 200,
                "GET /config over HTTP/1.1"
            );
            Ok(())
        },
    );
}
