//! What the host was doing while a bench ran: the share of CPU time the
//! hypervisor gave to other guests ("steal").
//!
//! On a shared VM the same build measures differently from one hour to the
//! next (2026-12-03: 20–30 % steal under load, where the day before raw
//! libzmq sustained nearly twice the rate). Printing the steal beside the
//! figures tells a reader which runs were taken on a busy host, without
//! which ratios between runs mislead. Read from `/proc/stat` with the
//! `procfs` crate; on a host without it (or without the steal column) the
//! figure is simply absent.

use procfs::{CurrentSI, KernelStats};

/// Cumulative CPU time of all CPUs, in clock ticks, at one moment.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    steal: u64,
    total: u64,
}

impl CpuTimes {
    /// Now, or `None` where `/proc/stat` cannot be read or has no steal.
    pub fn now() -> Option<Self> {
        let t = KernelStats::current().ok()?.total;
        let steal = t.steal?;
        let total = t.user
            + t.nice
            + t.system
            + t.idle
            + t.iowait.unwrap_or(0)
            + t.irq.unwrap_or(0)
            + t.softirq.unwrap_or(0)
            + steal;
        Some(Self { steal, total })
    }

    /// The percentage of CPU time stolen between `self` and `later`, to one
    /// decimal; `None` if no tick passed.
    pub fn steal_pct_until(self, later: Self) -> Option<f64> {
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
