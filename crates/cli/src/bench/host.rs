//! What the host was doing while a bench ran: the share of CPU time the
//! hypervisor gave to other guests ("steal").
//!
//! On a shared VM the same build measures differently from one hour to the
//! next (2026-12-03: 20–30 % steal under load, where the day before raw
//! libzmq sustained nearly twice the rate). Printing the steal beside the
//! figures tells a reader which runs were taken on a busy host, without
//! which ratios between runs mislead. Read from the first line of
//! `/proc/stat` (`cpu  user nice system idle iowait irq softirq steal ...`,
//! in clock ticks; see proc_stat(5)); on a host without it, or without the
//! steal column, the figure is simply absent. (The `procfs` crate was tried
//! first: its reader looks up the clock tick in the process's auxiliary
//! vector, which crashed the bench under valgrind, and a ratio needs no
//! tick.)

/// Cumulative CPU time of all CPUs, in clock ticks, at one moment.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    steal: u64,
    total: u64,
}

impl CpuTimes {
    /// Now, or `None` where `/proc/stat` cannot be read or has no steal.
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The aggregate `cpu` line of a `/proc/stat` text. Guest time is
    /// already inside user time, so the total is the first eight columns.
    fn parse(stat: &str) -> Option<Self> {
        let mut fields = stat.lines().next()?.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let ticks: Vec<u64> = fields
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let steal = *ticks.get(7)?;
        Some(Self {
            steal,
            total: ticks.iter().sum(),
        })
    }

    /// The percentage of CPU time stolen between `self` and `later`, to one
    /// decimal; `None` if no tick passed.
    fn steal_pct_until(self, later: Self) -> Option<f64> {
        let total = later.total.checked_sub(self.total)?;
        let steal = later.steal.checked_sub(self.steal)?;
        (total > 0).then(|| (steal as f64 * 1000.0 / total as f64).round() / 10.0)
    }
}

/// Steal between two optional readings (either missing: unknown).
pub fn steal_pct(before: Option<CpuTimes>, after: Option<CpuTimes>) -> Option<f64> {
    before?.steal_pct_until(after?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_aggregate_cpu_line() {
        let stat = "cpu  100 5 50 800 10 0 5 30 7 0\ncpu0 50 2 25 400 5 0 2 15 3 0\n";
        let t = CpuTimes::parse(stat).expect("a cpu line with steal");
        assert_eq!((t.steal, t.total), (30, 1000));
        assert!(
            CpuTimes::parse("cpu  100 5 50 800\n").is_none(),
            "no steal column"
        );
        assert!(CpuTimes::parse("intr 1 2 3\n").is_none());
        assert!(CpuTimes::parse("").is_none());
    }

    #[test]
    fn steal_is_the_stolen_share_of_the_ticks_between_readings() {
        let a = CpuTimes {
            steal: 10,
            total: 1000,
        };
        let b = CpuTimes {
            steal: 35,
            total: 1200,
        };
        assert_eq!(a.steal_pct_until(b), Some(12.5));
        assert_eq!(a.steal_pct_until(a), None, "no tick passed");
        assert_eq!(b.steal_pct_until(a), None, "readings out of order");
    }
}
