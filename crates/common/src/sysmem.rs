//! This machine's memory, for refusing work that cannot fit before allocating it: total and available bytes
//! from `/proc/meminfo` (Linux), a cgroup v2 `memory.max` limit when one is set and smaller, and a formatter
//! for "needs ~N GiB, this machine has M" messages. Elsewhere (no /proc) nothing is known and checks pass.

/// Bytes of memory this process may use at most: min(MemTotal, cgroup limit). None when unknown.
pub fn total_bytes() -> Option<u64> {
    let total = meminfo_kib("MemTotal:").map(|k| k * 1024);
    match (total, cgroup_limit()) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// Bytes available now without swapping (MemAvailable, capped by the cgroup limit). None when unknown.
pub fn available_bytes() -> Option<u64> {
    let avail = meminfo_kib("MemAvailable:").map(|k| k * 1024);
    match (avail, cgroup_limit()) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn cgroup_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
    text.trim().parse().ok()
}

/// `1.5 GiB`, `312 MiB`: a byte count for people.
pub fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let f = b as f64;
    if f >= GIB {
        format!("{:.1} GiB", f / GIB)
    } else {
        format!("{:.0} MiB", (f / MIB).max(1.0))
    }
}

/// Err("{what} needs ~N GiB, this machine has M GiB (A GiB available)") when `need` exceeds the total memory.
/// Unknown memory (no /proc) passes.
pub fn check_fits(what: &str, need: u64) -> Result<(), String> {
    match total_bytes() {
        Some(total) if need > total => Err(format!(
            "{what} needs ~{}, this machine has {}{}",
            human_bytes(need),
            human_bytes(total),
            available_bytes().map(|a| format!(" ({} available)", human_bytes(a))).unwrap_or_default()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_refuses_the_impossible() {
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(312 << 20), "312 MiB");
        if total_bytes().is_some() {
            let e = check_fits("this run", u64::MAX).unwrap_err();
            assert!(e.contains("this run needs ~") && e.contains("this machine has"), "{e}");
            assert!(check_fits("a byte", 1).is_ok());
        }
    }
}
