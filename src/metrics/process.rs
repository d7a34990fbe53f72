//! Process metrics read from `/proc` on each scrape (Linux; elsewhere they
//! are simply absent): CPU time, memory, file descriptors, threads, start
//! time. Names follow the Prometheus client libraries' `process_*`
//! convention so existing dashboards work.

use std::fs;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub start_time_seconds: f64,
    pub threads: u64,
}

/// Clock ticks per second of `/proc/*/stat` times. `USER_HZ` is 100 on
/// every Linux architecture Portico builds for (and reading `sysconf`
/// would need `unsafe`), as the Prometheus Go client also assumes.
const USER_HZ: f64 = 100.0;

pub fn read() -> Option<ProcessStats> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let mut s = parse_stat(&stat)?;
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        if let Some(kb) = status_kb(&status, "VmRSS:") {
            s.resident_bytes = kb * 1024;
        }
    }
    if let Some(btime) = fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| boot_time(&t))
    {
        s.start_time_seconds += btime as f64;
    }
    s.open_fds = fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    s.max_fds = fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| max_open_files(&t));
    Some(s)
}

/// Fields of `/proc/self/stat` after the command name (which may contain
/// spaces and parentheses, so the split is at the last `)`). The start time
/// is relative to boot here; [`read`] adds the boot time.
fn parse_stat(stat: &str) -> Option<ProcessStats> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field N is f[N - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let utime = num(14)?;
    let stime = num(15)?;
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / USER_HZ,
        threads: num(20)?,
        start_time_seconds: num(22)? as f64 / USER_HZ,
        virtual_bytes: num(23)?,
        // Pages; replaced by VmRSS (exact bytes whatever the page size).
        resident_bytes: num(24)? * 4096,
        ..Default::default()
    })
}

fn status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 50 0 0 20 0 7 0 12345 987654321 2000 18446744073709551615 1 1 0 0 0 0 0 4096 17415 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(stat).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time_seconds, 123.45);
        assert_eq!(s.virtual_bytes, 987654321);
        assert_eq!(
            status_kb("Name:\tx\nVmRSS:\t   1024 kB\n", "VmRSS:"),
            Some(1024)
        );
        assert_eq!(boot_time("cpu 1 2\nbtime 1700000000\n"), Some(1700000000));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[test]
    fn reads_this_process() {
        let Some(s) = read() else {
            return; // no /proc here
        };
        assert!(s.resident_bytes > 0);
        assert!(s.open_fds > 0);
        assert!(s.threads >= 1);
        assert!(s.start_time_seconds > 1_000_000_000.0, "{s:?}");
    }
}
