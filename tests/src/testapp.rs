//! The test application behind the `weft-testapp` binary: an echo server, a sink server (replies
//! with the SHA-256 of what it read) and a client that sends deterministic data with an
//! embedded marker and verifies every byte that comes back.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{HarnessError, Result};

/// Data is generated in blocks; each block starts with the marker, so a capture finds it in
/// every packet-sized piece of plaintext.
pub const BLOCK_LEN: usize = 4096;
const IO_CHUNK: usize = 64 * 1024;
/// A summary keeps this many error messages; the counts stay exact.
const MAX_ERRORS_KEPT: usize = 10;

/// An endless deterministic byte stream: block `i` is the marker followed by splitmix64 output
/// seeded with `(seed, i)`. Writer and verifier each run their own copy.
pub struct Pattern {
    seed: u64,
    marker: Vec<u8>,
    block: Vec<u8>,
    block_index: u64,
    offset: usize,
}

impl Pattern {
    pub fn new(seed: u64, marker: &[u8]) -> Pattern {
        let mut pattern = Pattern {
            seed,
            marker: marker[..marker.len().min(BLOCK_LEN)].to_vec(),
            block: vec![0; BLOCK_LEN],
            block_index: 0,
            offset: 0,
        };
        pattern.generate_block();
        pattern
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut written = 0;
        while written < buf.len() {
            if self.offset == BLOCK_LEN {
                self.block_index += 1;
                self.offset = 0;
                self.generate_block();
            }
            let n = (BLOCK_LEN - self.offset).min(buf.len() - written);
            buf[written..written + n].copy_from_slice(&self.block[self.offset..self.offset + n]);
            self.offset += n;
            written += n;
        }
    }

    fn generate_block(&mut self) {
        let mut state = self.seed ^ self.block_index.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        for chunk in self.block.chunks_mut(8) {
            let word = splitmix64(&mut state).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        self.block[..self.marker.len()].copy_from_slice(&self.marker);
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What the client expects back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The same bytes (an echo server).
    Echo,
    /// The 32-byte SHA-256 of the bytes (a sink server).
    Sink,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Mode, String> {
        match s {
            "echo" => Ok(Mode::Echo),
            "sink" => Ok(Mode::Sink),
            other => Err(format!("unknown mode {other:?} (expected echo or sink)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect: SocketAddr,
    /// Bytes sent on each connection.
    pub bytes: u64,
    /// Concurrent connections (or concurrent workers with `duration`).
    pub connections: usize,
    pub marker: String,
    pub mode: Mode,
    /// Keep opening new connections until this much time has passed.
    pub duration: Option<Duration>,
    /// Pause between a worker's connections in duration mode.
    pub interval: Duration,
    /// Bound on connect and on every read and write.
    pub io_timeout: Duration,
}

/// The client's one-line JSON report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSummary {
    pub ok: u64,
    pub failed: u64,
    /// Bytes sent and verified on the successful connections.
    pub bytes: u64,
    /// The first few failures, as text.
    #[serde(default)]
    pub errors: Vec<String>,
}

impl ClientSummary {
    /// At least one connection and no failure: the client's exit status.
    pub fn success(&self) -> bool {
        self.ok > 0 && self.failed == 0
    }

    /// The summary from the client's stdout (its last non-empty line).
    pub fn from_stdout(stdout: &str) -> Result<ClientSummary> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .ok_or_else(|| HarnessError::invalid("client output", "empty stdout"))?;
        serde_json::from_str(line)
            .map_err(|e| HarnessError::invalid("client summary", format!("{line:?}: {e}")))
    }
}

struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
        }
    }

    fn record(&self, result: std::result::Result<u64, String>) {
        match result {
            Ok(bytes) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(error) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut errors = match self.errors.lock() {
                    Ok(e) => e,
                    Err(poisoned) => poisoned.into_inner(),
                };
                if errors.len() < MAX_ERRORS_KEPT {
                    errors.push(error);
                }
            }
        }
    }

    fn summary(self) -> ClientSummary {
        ClientSummary {
            ok: self.ok.into_inner(),
            failed: self.failed.into_inner(),
            bytes: self.bytes.into_inner(),
            errors: self.errors.into_inner().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

/// Runs the client: `connections` simultaneous connections (all connected before any sends),
/// or with `duration`, `connections` workers each opening connection after connection.
pub fn run_client(config: &ClientConfig) -> ClientSummary {
    let tally = Tally::new();
    let workers = config.connections.max(1);
    match config.duration {
        None => {
            let barrier = Barrier::new(workers);
            std::thread::scope(|scope| {
                for worker in 0..workers {
                    let (tally, barrier) = (&tally, &barrier);
                    scope.spawn(move || {
                        let stream = connect(config);
                        // Everyone waits, even after a failed connect, or the others would hang.
                        barrier.wait();
                        tally.record(stream.and_then(|s| transfer(config, s, worker as u64)));
                    });
                }
            });
        }
        Some(duration) => {
            let deadline = Instant::now() + duration;
            std::thread::scope(|scope| {
                for worker in 0..workers {
                    let tally = &tally;
                    scope.spawn(move || {
                        let mut round: u64 = 0;
                        while Instant::now() < deadline {
                            let seed = ((worker as u64) << 32) | round;
                            tally.record(connect(config).and_then(|s| transfer(config, s, seed)));
                            round += 1;
                            std::thread::sleep(config.interval);
                        }
                    });
                }
            });
        }
    }
    tally.summary()
}

fn connect(config: &ClientConfig) -> std::result::Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&config.connect, config.io_timeout)
        .map_err(|e| format!("connect {}: {e}", config.connect))?;
    stream
        .set_read_timeout(Some(config.io_timeout))
        .and_then(|()| stream.set_write_timeout(Some(config.io_timeout)))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(|e| format!("socket options: {e}"))?;
    Ok(stream)
}

/// Sends `config.bytes` of pattern `seed`, half-closes, and verifies the reply. Returns the
/// number of bytes verified.
fn transfer(
    config: &ClientConfig,
    stream: TcpStream,
    seed: u64,
) -> std::result::Result<u64, String> {
    let writer = stream
        .try_clone()
        .map_err(|e| format!("cloning socket: {e}"))?;
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| send(writer, config.bytes, seed, config.marker.as_bytes()));
        let received = match config.mode {
            Mode::Echo => verify_echo(&stream, config.bytes, seed, config.marker.as_bytes()),
            Mode::Sink => read_digest(&stream),
        };
        if received.is_err() {
            // Unblock the sender instead of letting it wait for its write timeout.
            let _ = stream.shutdown(Shutdown::Both);
        }
        let sent_digest = sender
            .join()
            .map_err(|_| "sender thread panicked".to_string())?;
        let received = received?;
        let sent_digest = sent_digest?;
        if config.mode == Mode::Sink && received != sent_digest {
            return Err(format!(
                "sink digest mismatch: sent sha256 {}, server read sha256 {}",
                hex::encode(&sent_digest),
                hex::encode(&received)
            ));
        }
        Ok(config.bytes)
    })
}

/// Writes the pattern then shuts down the write side; returns the SHA-256 of what was sent.
fn send(
    mut writer: TcpStream,
    bytes: u64,
    seed: u64,
    marker: &[u8],
) -> std::result::Result<Vec<u8>, String> {
    let mut pattern = Pattern::new(seed, marker);
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; IO_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(IO_CHUNK).min(IO_CHUNK);
        pattern.fill(&mut buf[..n]);
        digest.update(&buf[..n]);
        writer
            .write_all(&buf[..n])
            .map_err(|e| format!("write after {} bytes: {e}", bytes - left))?;
        left -= n as u64;
    }
    writer
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown(write): {e}"))?;
    Ok(digest.finish().as_ref().to_vec())
}

fn verify_echo(
    mut stream: &TcpStream,
    bytes: u64,
    seed: u64,
    marker: &[u8],
) -> std::result::Result<Vec<u8>, String> {
    let mut expected = Pattern::new(seed, marker);
    let mut buf = vec![0u8; IO_CHUNK];
    let mut want = vec![0u8; IO_CHUNK];
    let mut got: u64 = 0;
    loop {
        let n = stream
            .read(&mut buf)
            .map_err(|e| format!("read after {got} of {bytes} echoed bytes: {e}"))?;
        if n == 0 {
            break;
        }
        if got + n as u64 > bytes {
            return Err(format!("echo sent more than the {bytes} bytes sent"));
        }
        expected.fill(&mut want[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
            return Err(format!("echoed data differs at byte {}", got + i as u64));
        }
        got += n as u64;
    }
    if got != bytes {
        return Err(format!("echo ended after {got} of {bytes} bytes"));
    }
    Ok(Vec::new())
}

fn read_digest(mut stream: &TcpStream) -> std::result::Result<Vec<u8>, String> {
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .map_err(|e| format!("reading the sink's digest: {e}"))?;
    if reply.len() != 32 {
        return Err(format!(
            "sink replied {} bytes, expected a 32-byte sha256",
            reply.len()
        ));
    }
    Ok(reply)
}

/// Accepts forever; each connection gets its own thread.
pub fn serve(listener: TcpListener, mode: Mode) -> io::Result<()> {
    loop {
        let (stream, peer) = listener.accept()?;
        std::thread::spawn(move || {
            let result = match mode {
                Mode::Echo => echo_connection(stream),
                Mode::Sink => sink_connection(stream),
            };
            if let Err(e) = result {
                eprintln!("weft-testapp: connection from {peer}: {e}");
            }
        });
    }
}

/// Echoes until the peer half-closes, then half-closes back (so the peer can still read
/// everything that was in flight).
fn echo_connection(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; IO_CHUNK];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
    }
    stream.shutdown(Shutdown::Write)
}

fn sink_connection(mut stream: TcpStream) -> io::Result<()> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; IO_CHUNK];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
    }
    stream.write_all(digest.finish().as_ref())?;
    stream.shutdown(Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern_bytes(seed: u64, marker: &[u8], len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        Pattern::new(seed, marker).fill(&mut out);
        out
    }

    #[test]
    fn pattern_is_deterministic_and_chunking_does_not_matter() {
        let whole = pattern_bytes(7, b"MARK", 3 * BLOCK_LEN + 100);
        let mut pieces = Vec::new();
        let mut p = Pattern::new(7, b"MARK");
        for size in [1, 4095, 5000, 3000, 292] {
            let mut buf = vec![0u8; size];
            p.fill(&mut buf);
            pieces.extend_from_slice(&buf);
        }
        assert_eq!(whole.len(), pieces.len());
        assert_eq!(whole, pieces);
        assert_ne!(
            whole,
            pattern_bytes(8, b"MARK", whole.len()),
            "seeds must differ"
        );
        assert_ne!(
            whole[4..BLOCK_LEN],
            whole[BLOCK_LEN + 4..2 * BLOCK_LEN],
            "blocks must differ"
        );
    }

    #[test]
    fn every_block_starts_with_the_marker() {
        let data = pattern_bytes(1, b"WEFT-MARKER", 4 * BLOCK_LEN);
        for block in data.chunks(BLOCK_LEN) {
            assert!(block.starts_with(b"WEFT-MARKER"));
        }
        assert_eq!(pattern_bytes(1, b"", 16).len(), 16);
    }

    fn local_server(mode: Mode) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve(listener, mode));
        addr
    }

    fn config(connect: SocketAddr, mode: Mode) -> ClientConfig {
        ClientConfig {
            connect,
            bytes: 300_000,
            connections: 4,
            marker: "MARKER".to_string(),
            mode,
            duration: None,
            interval: Duration::from_millis(20),
            io_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn echo_round_trip_verifies() {
        let summary = run_client(&config(local_server(Mode::Echo), Mode::Echo));
        assert_eq!(
            summary,
            ClientSummary {
                ok: 4,
                failed: 0,
                bytes: 1_200_000,
                errors: vec![]
            }
        );
        assert!(summary.success());
    }

    #[test]
    fn sink_round_trip_verifies() {
        let summary = run_client(&config(local_server(Mode::Sink), Mode::Sink));
        assert_eq!((summary.ok, summary.failed), (4, 0), "{summary:?}");
    }

    #[test]
    fn echo_client_against_a_sink_fails() {
        let summary = run_client(&config(local_server(Mode::Sink), Mode::Echo));
        assert_eq!((summary.ok, summary.failed), (0, 4), "{summary:?}");
        assert!(!summary.success());
        assert!(summary.errors[0].contains("differs") || summary.errors[0].contains("ended"));
    }

    #[test]
    fn corrupted_echo_is_detected() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut data = Vec::new();
                stream.read_to_end(&mut data).unwrap();
                data[12345] ^= 1;
                stream.write_all(&data).unwrap();
            }
        });
        let mut config = config(addr, Mode::Echo);
        config.connections = 1;
        let summary = run_client(&config);
        assert_eq!(summary.failed, 1);
        assert!(
            summary.errors[0].contains("differs at byte 12345"),
            "{summary:?}"
        );
    }

    #[test]
    fn refused_connections_count_as_failures() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let summary = run_client(&config(addr, Mode::Echo));
        assert_eq!((summary.ok, summary.failed), (0, 4));
        assert!(summary.errors[0].starts_with("connect"), "{summary:?}");
    }

    #[test]
    fn duration_mode_keeps_connecting() {
        let mut config = config(local_server(Mode::Echo), Mode::Echo);
        config.connections = 2;
        config.bytes = 10_000;
        config.duration = Some(Duration::from_millis(600));
        let start = Instant::now();
        let summary = run_client(&config);
        assert!(start.elapsed() >= Duration::from_millis(600));
        assert!(summary.ok >= 10, "{summary:?}");
        assert_eq!(summary.failed, 0);
    }

    #[test]
    fn summary_json_round_trips_from_stdout() {
        let summary = ClientSummary {
            ok: 3,
            failed: 1,
            bytes: 30,
            errors: vec!["x".into()],
        };
        let stdout = format!("noise\n{}\n\n", serde_json::to_string(&summary).unwrap());
        assert_eq!(ClientSummary::from_stdout(&stdout).unwrap(), summary);
        assert_eq!(
            ClientSummary::from_stdout("{\"ok\":1,\"failed\":0,\"bytes\":5}")
                .unwrap()
                .errors,
            Vec::<String>::new()
        );
        assert!(ClientSummary::from_stdout("").is_err());
        assert!(ClientSummary::from_stdout("not json").is_err());
    }

    #[test]
    fn modes_parse() {
        assert_eq!("echo".parse::<Mode>(), Ok(Mode::Echo));
        assert_eq!("sink".parse::<Mode>(), Ok(Mode::Sink));
        assert!("other".parse::<Mode>().is_err());
    }
}
