//! Packet capture with tcpdump inside a namespace, and a pcap reader that extracts TCP
//! payloads, so a test can check what actually crossed the wire (plaintext vs TLS records).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{HarnessError, IoContext, Result};
use crate::netns::Netns;
use crate::proc::{Cmd, Proc, SIGINT};

const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;
const LINKTYPE_LINUX_SLL: u32 = 113;
const LINKTYPE_IPV4: u32 = 228;
const LINKTYPE_IPV6: u32 = 229;
const LINKTYPE_LINUX_SLL2: u32 = 276;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
/// The capture file must stay unchanged this long before tcpdump is stopped...
const SETTLE_QUIET: Duration = Duration::from_millis(300);
/// ...but a busy link (other traffic matching the filter) must not delay the stop forever.
const SETTLE_MAX: Duration = Duration::from_secs(5);

/// A running `tcpdump -w` in one namespace.
pub struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing on `iface` in `netns` with a pcap `filter` (e.g. `"tcp port 8080"`),
    /// and returns once tcpdump is listening, so no packet sent afterwards is missed.
    pub fn start(netns: &Netns, iface: &str, filter: &str) -> Result<Capture> {
        let file = netns.scratch_file(&format!("capture-{iface}.pcap"));
        // --immediate-mode: packets reach tcpdump as they arrive, not in blocks flushed by a
        // timer (packets still waiting in a block at SIGINT would be lost);
        // -U: write each packet as it arrives (nothing lost in a buffer at stop);
        // -B: a 64 MiB kernel buffer; veth hands over 64 KiB GSO packets, and the default
        // 2 MiB drops some when a local transfer bursts at memory speed;
        // -Z root: keep root so tcpdump can write into our temp dir (some builds drop to a
        // `tcpdump` user by default).
        let cmd = Cmd::new("tcpdump")
            .args([
                "-i",
                iface,
                "-n",
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-B",
                "65536",
                "-Z",
                "root",
                "-w",
            ])
            .arg(&file)
            .args(filter.split_whitespace());
        let mut proc = netns.spawn(cmd)?;
        proc.wait_for_output("listening on", Duration::from_secs(10))?;
        Ok(Capture { proc, file })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Stops tcpdump (SIGINT: it flushes and exits) and reads what it captured.
    pub fn stop(mut self) -> Result<Captured> {
        // tcpdump may still be reading the last packets from the kernel's buffer; SIGINT
        // would drop them. With -U every packet is written at once, so a file that stopped
        // growing means tcpdump has caught up.
        self.wait_until_file_settles();
        self.proc.signal(SIGINT)?;
        if self.proc.wait_timeout(Duration::from_secs(5))?.is_none() {
            self.proc.kill()?;
        }
        let bytes =
            std::fs::read(&self.file).context(|| format!("reading {}", self.file.display()))?;
        parse_pcap(&bytes)
    }

    fn wait_until_file_settles(&self) {
        let size = || std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0);
        let deadline = Instant::now() + SETTLE_MAX;
        let mut last = size();
        let mut unchanged_since = Instant::now();
        while Instant::now() < deadline && unchanged_since.elapsed() < SETTLE_QUIET {
            std::thread::sleep(Duration::from_millis(50));
            let now = size();
            if now != last {
                last = now;
                unchanged_since = Instant::now();
            }
        }
    }
}

/// One TCP segment that carried data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
pub struct Captured {
    pub link_type: u32,
    /// Packets read from the file (including ones without TCP payload).
    pub packets: usize,
    /// Segments with a non-empty TCP payload, in capture order.
    pub segments: Vec<TcpSegment>,
}

impl Captured {
    /// Every TCP payload concatenated in capture order (all flows interleaved).
    pub fn payload(&self) -> Vec<u8> {
        self.segments
            .iter()
            .flat_map(|s| s.payload.iter().copied())
            .collect()
    }

    /// Per direction (src → dst), the payloads concatenated in capture order.
    pub fn flows(&self) -> BTreeMap<(SocketAddr, SocketAddr), Vec<u8>> {
        let mut flows: BTreeMap<(SocketAddr, SocketAddr), Vec<u8>> = BTreeMap::new();
        for s in &self.segments {
            flows
                .entry((s.src, s.dst))
                .or_default()
                .extend_from_slice(&s.payload);
        }
        flows
    }

    /// Whether `needle` appears in any direction's byte stream (also across segment borders).
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.flows()
            .values()
            .any(|bytes| find(bytes, needle).is_some())
    }

    pub fn payload_bytes(&self) -> usize {
        self.segments.iter().map(|s| s.payload.len()).sum()
    }
}

/// Index of the first occurrence of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(detail: impl Into<String>) -> HarnessError {
    HarnessError::invalid("pcap file", detail)
}

/// Reads a classic pcap file (either byte order, µs or ns timestamps) and extracts the TCP
/// payloads of IPv4/IPv6 packets over Ethernet, Linux cooked (v1/v2) or raw-IP link types.
pub fn parse_pcap(bytes: &[u8]) -> Result<Captured> {
    if bytes.len() < 24 {
        return Err(invalid(format!(
            "{} bytes, shorter than the global header",
            bytes.len()
        )));
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let big_endian = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
        _ => {
            return Err(invalid(format!(
                "unknown magic {magic:02x?} (pcapng is not supported)"
            )))
        }
    };
    let read_u32 = |at: usize| -> u32 {
        let b = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let link_type = read_u32(20) & 0x0fff_ffff;
    let mut captured = Captured {
        link_type,
        ..Captured::default()
    };
    let mut at = 24;
    while at < bytes.len() {
        if bytes.len() - at < 16 {
            // tcpdump killed mid-write: the last record is incomplete; keep what is whole.
            break;
        }
        let incl_len = read_u32(at + 8) as usize;
        let data_start = at + 16;
        let Some(data) = bytes.get(data_start..data_start + incl_len) else {
            break;
        };
        captured.packets += 1;
        if let Some(segment) = tcp_segment(link_type, data)? {
            captured.segments.push(segment);
        }
        at = data_start + incl_len;
    }
    Ok(captured)
}

fn tcp_segment(link_type: u32, frame: &[u8]) -> Result<Option<TcpSegment>> {
    let (ethertype, ip) = match link_type {
        LINKTYPE_ETHERNET => {
            if frame.len() < 14 {
                return Ok(None);
            }
            let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
            let mut offset = 14;
            if ethertype == ETHERTYPE_VLAN && frame.len() >= 18 {
                ethertype = u16::from_be_bytes([frame[16], frame[17]]);
                offset = 18;
            }
            (Some(ethertype), &frame[offset..])
        }
        LINKTYPE_LINUX_SLL => {
            if frame.len() < 16 {
                return Ok(None);
            }
            (
                Some(u16::from_be_bytes([frame[14], frame[15]])),
                &frame[16..],
            )
        }
        LINKTYPE_LINUX_SLL2 => {
            if frame.len() < 20 {
                return Ok(None);
            }
            (Some(u16::from_be_bytes([frame[0], frame[1]])), &frame[20..])
        }
        LINKTYPE_RAW | LINKTYPE_IPV4 | LINKTYPE_IPV6 => (None, frame),
        other => return Err(invalid(format!("unsupported link type {other}"))),
    };
    let version = ip.first().map(|b| b >> 4);
    match (ethertype, version) {
        (Some(ETHERTYPE_IPV4) | None, Some(4)) => Ok(ipv4_tcp(ip)),
        (Some(ETHERTYPE_IPV6) | None, Some(6)) => Ok(ipv6_tcp(ip)),
        _ => Ok(None),
    }
}

fn ipv4_tcp(ip: &[u8]) -> Option<TcpSegment> {
    if ip.len() < 20 {
        return None;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if ip[9] != IPPROTO_TCP || header_len < 20 || fragment_offset != 0 {
        return None;
    }
    // A zero total length appears on large GSO packets captured before segmentation: the
    // captured length is then the only bound.
    let end = if total_len == 0 {
        ip.len()
    } else {
        total_len.min(ip.len())
    };
    let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    tcp(src, dst, ip.get(header_len..end)?)
}

fn ipv6_tcp(ip: &[u8]) -> Option<TcpSegment> {
    if ip.len() < 40 || ip[6] != IPPROTO_TCP {
        // Extension headers are not followed: the tests' traffic never carries them.
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let end = if payload_len == 0 {
        ip.len()
    } else {
        (40 + payload_len).min(ip.len())
    };
    let addr = |at: usize| -> Option<IpAddr> {
        let octets: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(octets)))
    };
    tcp(addr(8)?, addr(24)?, ip.get(40..end)?)
}

fn tcp(src: IpAddr, dst: IpAddr, segment: &[u8]) -> Option<TcpSegment> {
    if segment.len() < 20 {
        return None;
    }
    let src_port = u16::from_be_bytes([segment[0], segment[1]]);
    let dst_port = u16::from_be_bytes([segment[2], segment[3]]);
    let data_offset = usize::from(segment[12] >> 4) * 4;
    let payload = segment.get(data_offset..)?;
    if data_offset < 20 || payload.is_empty() {
        return None;
    }
    Some(TcpSegment {
        src: SocketAddr::new(src, src_port),
        dst: SocketAddr::new(dst, dst_port),
        payload: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet/IPv4/TCP frame (TCP header with 12 bytes of options) carrying `payload`.
    fn ethernet_tcp_frame(payload: &[u8], src_port: u16) -> Vec<u8> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
        let tcp_len = 32;
        let total = (20 + tcp_len + payload.len()) as u16;
        frame.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            1,
            0x40,
            0,
            64,
            6,
            0,
            0,
        ]);
        frame.extend_from_slice(&[198, 18, 0, 10, 198, 18, 0, 20]);
        frame.extend_from_slice(&src_port.to_be_bytes());
        frame.extend_from_slice(&8080u16.to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x80, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        frame.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 0, 0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        // Ethernet padding after the IP packet must not be taken as payload.
        frame.extend_from_slice(&[0xee; 4]);
        frame
    }

    fn pcap(big_endian: bool, link_type: u32, frames: &[Vec<u8>]) -> Vec<u8> {
        let u32_bytes = |v: u32| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let u16_bytes = |v: u16| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let mut out = Vec::new();
        out.extend_from_slice(&u32_bytes(0xa1b2_c3d4));
        out.extend_from_slice(&u16_bytes(2));
        out.extend_from_slice(&u16_bytes(4));
        out.extend_from_slice(&u32_bytes(0));
        out.extend_from_slice(&u32_bytes(0));
        out.extend_from_slice(&u32_bytes(262_144));
        out.extend_from_slice(&u32_bytes(link_type));
        for (i, frame) in frames.iter().enumerate() {
            out.extend_from_slice(&u32_bytes(1_700_000_000 + i as u32));
            out.extend_from_slice(&u32_bytes(0));
            out.extend_from_slice(&u32_bytes(frame.len() as u32));
            out.extend_from_slice(&u32_bytes(frame.len() as u32));
            out.extend_from_slice(frame);
        }
        out
    }

    #[test]
    fn extracts_tcp_payloads_in_both_byte_orders() {
        for big_endian in [false, true] {
            let file = pcap(
                big_endian,
                LINKTYPE_ETHERNET,
                &[
                    ethernet_tcp_frame(b"hello MAR", 40000),
                    ethernet_tcp_frame(b"", 40000),
                    ethernet_tcp_frame(b"KER world", 40000),
                    ethernet_tcp_frame(b"other flow", 40001),
                ],
            );
            let captured = parse_pcap(&file).unwrap();
            assert_eq!(captured.packets, 4);
            assert_eq!(captured.segments.len(), 3);
            assert_eq!(
                captured.segments[0].src,
                "198.18.0.10:40000".parse().unwrap()
            );
            assert_eq!(
                captured.segments[0].dst,
                "198.18.0.20:8080".parse().unwrap()
            );
            assert_eq!(captured.payload(), b"hello MARKER worldother flow");
            assert!(captured.contains(b"MARKER"));
            assert!(
                !captured.contains(b"worldother"),
                "flows must not be glued together"
            );
            assert_eq!(captured.payload_bytes(), 28);
        }
    }

    #[test]
    fn reads_linux_cooked_and_raw_ip() {
        let eth = ethernet_tcp_frame(b"cooked", 1234);
        let ip_packet = eth[14..eth.len() - 4].to_vec();
        let mut sll = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0, 0x08, 0x00];
        sll.extend_from_slice(&ip_packet);
        let captured = parse_pcap(&pcap(false, LINKTYPE_LINUX_SLL, &[sll])).unwrap();
        assert_eq!(captured.payload(), b"cooked");
        let captured = parse_pcap(&pcap(false, LINKTYPE_RAW, &[ip_packet])).unwrap();
        assert_eq!(captured.payload(), b"cooked");
    }

    #[test]
    fn tolerates_a_truncated_last_record_and_rejects_garbage() {
        let mut file = pcap(false, LINKTYPE_ETHERNET, &[ethernet_tcp_frame(b"whole", 1)]);
        let second = pcap(false, LINKTYPE_ETHERNET, &[ethernet_tcp_frame(b"cut", 2)]);
        file.extend_from_slice(&second[24..second.len() - 10]);
        let captured = parse_pcap(&file).unwrap();
        assert_eq!(captured.payload(), b"whole");
        assert!(parse_pcap(b"not a pcap file at all, definitely").is_err());
        assert!(parse_pcap(&[0xd4, 0xc3, 0xb2, 0xa1]).is_err());
    }

    #[test]
    fn find_locates_needles() {
        assert_eq!(find(b"abcabc", b"ca"), Some(2));
        assert_eq!(find(b"abc", b"abcd"), None);
        assert_eq!(find(b"abc", b""), Some(0));
    }
}
