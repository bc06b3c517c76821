//! The proxy's own resource use, read from `/proc/self` when Prometheus scrapes: resident
//! memory, CPU time, open file descriptors and start time (the usual `process_*` set,
//! under weft's prefix).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What one read of `/proc/self` says.
#[derive(Debug, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub start_time_seconds: f64,
    pub resident_bytes: i64,
    pub open_fds: i64,
}

impl ProcessStats {
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as i64;
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        parse(&stat, &statm, &boot, ticks as f64, page, open_fds)
    }
}

/// `stat` fields after the command name (which may contain spaces and parentheses):
/// utime and stime are fields 14 and 15, starttime 22 (1-based, man proc(5)).
fn parse(
    stat: &str,
    statm: &str,
    proc_stat: &str,
    ticks: f64,
    page: i64,
    open_fds: i64,
) -> Option<ProcessStats> {
    if ticks <= 0.0 || page <= 0 {
        return None;
    }
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    let (utime, stime, start) = (field(14)?, field(15)?, field(22)?);
    let resident_pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let btime: f64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(ProcessStats {
        cpu_seconds: (utime + stime) / ticks,
        start_time_seconds: btime + start / ticks,
        resident_bytes: resident_pages * page,
        open_fds,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time",
            None,
            cpu.metric_type(),
        )?)?;
        let rss = ConstGauge::new(s.resident_bytes);
        rss.encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory",
            None,
            rss.metric_type(),
        )?)?;
        let fds = ConstGauge::new(s.open_fds);
        fds.encode(encoder.encode_descriptor(
            "process_open_fds",
            "Open file descriptors",
            None,
            fds.metric_type(),
        )?)?;
        let start = ConstGauge::new(s.start_time_seconds);
        start.encode(encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time (Unix time)",
            None,
            start.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files_with_odd_command_names() {
        let stat = "1234 (weft (proxy) x) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 1 0 1000 12345678 2000 18446744073709551615";
        let s = parse(
            stat,
            "3000 2000 100 10 0 500 0",
            "cpu 1 2 3\nbtime 1700000000\n",
            100.0,
            4096,
            12,
        )
        .unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.resident_bytes, 2000 * 4096);
        assert_eq!(s.open_fds, 12);
        assert_eq!(parse("garbage", "", "", 100.0, 4096, 0), None);
    }

    #[test]
    fn reads_this_process() {
        let s = ProcessStats::read().unwrap();
        assert!(s.resident_bytes > 0 && s.open_fds > 0 && s.start_time_seconds > 1.0e9);
    }
}
