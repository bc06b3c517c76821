//! The demo's authorization part: an AuthorizationPolicy lets only the client's service
//! account GET `/` and `/api/*` on the web pods; the demo makes one allowed and two denied
//! calls and shows the proxy's reason.

use std::net::{Ipv4Addr, SocketAddr};

use super::app;

pub const POLICY_NAME: &str = "web-access";

pub fn policy_yaml(namespace: &str, app_port: u16) -> String {
    format!(
        "apiVersion: policy.weft.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {POLICY_NAME}\n  namespace: {namespace}\nspec:\n  selector:\n    matchLabels:\n      app: web\n  ports: [{app_port}]\n  action: ALLOW\n  rules:\n  - from: [{{serviceAccounts: [\"{namespace}/client\"]}}]\n    to: [{{methods: [GET], paths: [\"/\", \"/api/*\"]}}]\n"
    )
}

/// One call as a user would see it: who, what, the status and the proxy's reason.
pub struct Call {
    pub who: &'static str,
    pub what: String,
    pub status: Result<u16, String>,
    pub reason: String,
    pub expect: u16,
}

pub fn call(who: &'static str, addr: SocketAddr, path: &str, expect: u16) -> Call {
    let (status, reason) = match app::http_request(addr, "GET", path, "web.demo") {
        Ok((status, headers, body)) => {
            let reason = headers
                .get("x-weft-error")
                .cloned()
                .unwrap_or_else(|| body.trim().to_string());
            (Ok(status), reason)
        }
        Err(e) => (Err(e), String::new()),
    };
    Call {
        who,
        what: format!("GET {path} → {addr}"),
        status,
        reason,
        expect,
    }
}

pub fn web_pod(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

pub fn print(calls: &[Call]) -> Vec<(bool, String)> {
    println!("  authorization (AuthorizationPolicy {POLICY_NAME}: only demo/client may GET / and /api/* on the web pods):");
    let mut checks = Vec::new();
    for c in calls {
        let status = match &c.status {
            Ok(s) => s.to_string(),
            Err(e) => format!("error: {e}"),
        };
        println!("    {:<7} {:<32} {status:>4}  {}", c.who, c.what, c.reason);
        let ok = c.status.as_ref().is_ok_and(|s| *s == c.expect);
        checks.push((
            ok,
            format!("{} {}: expected {}, got {status}", c.who, c.what, c.expect),
        ));
    }
    checks
}
