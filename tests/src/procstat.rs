//! Resource use of running processes from /proc (e.g. a proxy's resident memory during a
//! large transfer).

use crate::error::{HarnessError, IoContext, Result};

/// Resident set size (`VmRSS` in /proc/<pid>/status), in bytes.
pub fn vm_rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).context(|| format!("reading {path}"))?;
    parse_vm_rss(&status).ok_or_else(|| HarnessError::invalid(path.as_str(), "no VmRSS line in kB"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let kib: u64 = parts.next()?.parse().ok()?;
    (parts.next()? == "kB").then_some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\tweft-proxy\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn reads_our_own_rss() {
        let rss = vm_rss_bytes(std::process::id()).unwrap();
        assert!(rss > 1024 * 1024, "{rss}");
        assert!(vm_rss_bytes(u32::MAX).is_err());
    }
}
