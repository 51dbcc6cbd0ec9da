//! Server processes seen from /proc (Linux): resident memory and CPU time, and the bench's
//! own open-file limit.

use serde_json::{json, Value};

/// One look at a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// RssAnon (heap, stacks; no file-backed pages), KiB.
    pub anon_kib: u64,
    /// User + system CPU time, seconds.
    pub cpu_secs: f64,
    pub threads: u64,
}

pub fn sample(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15 (proc(5)), so 11 and 12 counted from the state.
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Sample {
        rss_kib: field("VmRSS:"),
        anon_kib: field("RssAnon:"),
        cpu_secs: ticks as f64 / hz,
        threads: field("Threads:"),
    })
}

/// Samples of every PID (missing processes read as zeros).
pub fn sample_all(pids: &[u32]) -> Vec<Sample> {
    pids.iter()
        .map(|p| sample(*p).unwrap_or_default())
        .collect()
}

/// CPU seconds spent between two sample sets, summed over the processes.
pub fn cpu_between(before: &[Sample], after: &[Sample]) -> f64 {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a.cpu_secs - b.cpu_secs).max(0.0))
        .fold(0.0, |sum, x| sum + x)
}

pub fn to_json(s: &Sample) -> Value {
    json!({"rss_kib": s.rss_kib, "anon_kib": s.anon_kib, "cpu_secs": s.cpu_secs, "threads": s.threads})
}

/// Raises our open-file soft limit to the hard limit and returns it: the bench holds as many
/// sockets as the server it measures. The same raise as the server's own at start
/// (`confab::startup::raise_open_file_limit`), copied rather than depended on so the tool
/// does not build the server.
pub fn raise_open_file_limit() -> usize {
    // As far as the hard limit goes; if that is refused, the soft limit as it is, and 1024 if
    // it cannot be read.
    let files = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::Resource::NOFILE.get().map(|(soft, _)| soft));
    files.map_or(1024, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_has_memory_and_cpu_time() {
        let s = sample(std::process::id()).expect("/proc/self");
        assert!(s.rss_kib > 0 && s.threads >= 1, "{s:?}");
        assert!(sample(u32::MAX).is_none());
    }
}
