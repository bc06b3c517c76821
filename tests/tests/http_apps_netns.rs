//! Self-test of the HTTP-era test apps between two plain pods (no proxy, no iptables): the
//! http-server, the load generator (in-process and as a binary), WebSocket, gRPC and the
//! banner server all work across the bridge, so a mesh test failing with them blames the mesh.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tokio_tungstenite::tungstenite::Message;
use weft_e2e::grpcapp::{self, CHAT_COUNT, ECHO_TRAILER, ECHO_TRAILER_VALUE};
use weft_e2e::h1::{chunked, H1Connection};
use weft_e2e::httpapp::{
    request_counts, start_banner_server, start_grpc_server, start_http_server, ws_echo_blocking,
};
use weft_e2e::load::{run_http_load, run_load_blocking, LoadConfig};
use weft_e2e::{e2e_test, BASE_TOOLS};

const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 50051;
const BANNER_PORT: u16 = 3306;

#[test]
fn http_grpc_websocket_and_banner_apps_work_between_plain_pods() {
    e2e_test("netns_apps", BASE_TOOLS, |cluster| -> anyhow::Result<()> {
        let server = cluster.add_pod("server", 20)?;
        let client = cluster.add_pod("client", 10)?;
        let _http = start_http_server(&server, "web-1", HTTP_PORT, &[])?;
        let _flaky = start_http_server(&server, "flaky", 8081, &["--fail-percent", "30"])?;
        let _grpc = start_grpc_server(&server, "grpc-1", GRPC_PORT)?;
        let _banner = start_banner_server(&server, BANNER_PORT, "WEFT-BANNER")?;

        // Load generator, in-process from the client pod.
        let url = format!("http://{}/items", server.addr(HTTP_PORT));
        let report = client.in_netns(|| run_load_blocking(&LoadConfig::get(&url, 200, 4)))??;
        ensure!(report.all_succeeded(), "{report:?}");
        ensure!(report.served_by_count("web-1") == 200, "{report:?}");

        // The same, as the binary, against the failing server: exactly 30% 503s.
        let flaky_url = format!("http://{}/", server.addr(8081));
        let report = run_http_load(
            &client,
            &[
                "--url",
                &flaky_url,
                "--requests",
                "100",
                "--concurrency",
                "4",
                "--rate",
                "500",
            ],
            Duration::from_secs(60),
        )?;
        ensure!(
            report.total == 100 && report.errors == 0,
            "binary load: {report:?}"
        );
        ensure!(
            report.status_count(503) == 30 && report.status_count(200) == 70,
            "{report:?}"
        );
        let counts = request_counts(&server, 8081)?;
        ensure!(counts.method("GET") == 100, "{counts:?}");

        // Keep-alive and chunked bodies with the raw client.
        let mut conn = H1Connection::new(
            client.connect(server.addr(HTTP_PORT), Duration::from_secs(5))?,
            Duration::from_secs(10),
        )?;
        for _ in 0..3 {
            let response = conn.get("/", "web")?;
            ensure!(
                response.status() == 200 && response.body_text() == "web-1",
                "{response:?}"
            );
        }
        let mut request =
            b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        request.extend_from_slice(&chunked(&[b"abc", b"defg"]));
        conn.send_raw(&request)?;
        let response = conn.read_response()?;
        ensure!(
            response.head.is_chunked() && response.body == b"abcdefg",
            "{response:?}"
        );

        // WebSocket.
        let messages = vec![Message::text("hello"), Message::binary(vec![1u8; 70_000])];
        let addr = server.addr(HTTP_PORT);
        let echoes = client.in_netns(|| ws_echo_blocking(addr, "web", "/ws", &messages))??;
        ensure!(echoes == messages, "websocket echoes differ");

        // gRPC unary (with a requested failure) and bidi streaming.
        let grpc_addr = server.addr(GRPC_PORT);
        let outcomes =
            client.in_netns(|| grpcapp::echo_blocking(grpc_addr, &[("hi", 0), ("no", 7)]))??;
        ensure!(
            outcomes[0].code == tonic::Code::Ok && outcomes[0].served_by == "grpc-1",
            "{outcomes:?}"
        );
        ensure!(
            outcomes[1].code == tonic::Code::PermissionDenied
                && outcomes[1].metadata.get(ECHO_TRAILER).map(String::as_str)
                    == Some(ECHO_TRAILER_VALUE),
            "{outcomes:?}"
        );
        let chat = client.in_netns(|| grpcapp::chat_blocking(grpc_addr, &["a", "b", "c"], 0))??;
        ensure!(
            chat.code == tonic::Code::Ok
                && chat.replies.len() == 3
                && chat.trailers.get(CHAT_COUNT).map(String::as_str) == Some("3"),
            "{chat:?}"
        );

        // Banner.
        let started = Instant::now();
        let mut stream = client.connect(server.addr(BANNER_PORT), Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut banner = [0u8; 12];
        stream
            .read_exact(&mut banner)
            .context("reading the banner")?;
        ensure!(&banner == b"WEFT-BANNER\n", "banner {banner:?}");
        ensure!(
            started.elapsed() < Duration::from_millis(500),
            "banner took {:?}",
            started.elapsed()
        );
        stream.write_all(b"ping")?;
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo)?;
        ensure!(&echo == b"ping");
        Ok(())
    });
}
