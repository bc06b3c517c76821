//! Running `weft-testapp` inside namespaces: echo/sink servers and the verifying client.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::bins::bin;
use crate::error::{HarnessError, Result};
use crate::netns::Netns;
use crate::proc::{Cmd, Proc};
use crate::testapp::ClientSummary;

/// Runs `weft-testapp client --connect <addr> <args>` as root inside `netns` and returns its
/// JSON summary (whatever its exit status; assert on the summary).
pub fn run_client(netns: &Netns, connect: SocketAddr, args: &[&str]) -> Result<ClientSummary> {
    let proc = spawn_client(netns, connect, args)?;
    client_summary(proc, crate::netns::RUN_TIMEOUT)
}

/// Starts a client like [`run_client`] without waiting (pair with [`client_summary`]).
pub fn spawn_client(netns: &Netns, connect: SocketAddr, args: &[&str]) -> Result<Proc> {
    netns.spawn(
        Cmd::new(bin("weft-testapp")?)
            .args(["client", "--connect", &connect.to_string()])
            .args(args),
    )
}

/// Waits (up to `timeout`) for a client started by [`spawn_client`] and parses its summary.
pub fn client_summary(proc: Proc, timeout: Duration) -> Result<ClientSummary> {
    let label = proc.label().to_string();
    let output = proc.output(timeout)?;
    ClientSummary::from_stdout(&String::from_utf8_lossy(&output.stdout)).map_err(|e| {
        HarnessError::CommandFailed {
            command: label,
            status: format!("{} ({e})", output.status),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
}

/// Starts `weft-testapp <echo-server|sink-server> --listen 0.0.0.0:<port>` in `netns` and waits
/// until it listens.
pub fn start_server(netns: &Netns, kind: ServerKind, port: u16) -> Result<Proc> {
    let mode = match kind {
        ServerKind::Echo => "echo-server",
        ServerKind::Sink => "sink-server",
    };
    let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).to_string();
    let mut proc = netns.spawn(Cmd::new(bin("weft-testapp")?).args([mode, "--listen", &listen]))?;
    proc.wait_for_output("listening on", Duration::from_secs(10))?;
    Ok(proc)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Echo,
    Sink,
}
