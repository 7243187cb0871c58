//! Pacing a sender to an offered rate without drifting: the number of
//! messages due is computed from the elapsed time, so a late wake-up is caught
//! up on rather than lost.

use std::time::{Duration, Instant};

/// Paces `rate` messages per second from its creation (0: unpaced).
pub struct Pacer {
    start: Instant,
    rate: f64,
}

impl Pacer {
    pub fn new(rate: f64) -> Self {
        Self {
            start: Instant::now(),
            rate,
        }
    }

    /// How many messages should have been sent by now, in total.
    pub fn due(&self) -> u64 {
        if self.rate <= 0.0 {
            return u64::MAX;
        }
        (self.start.elapsed().as_secs_f64() * self.rate) as u64 + 1
    }

    /// Blocks the thread until message number `sent` (0-based) is due. It
    /// sleeps rather than spins, so a paced sender leaves the CPU to the
    /// receiver (on 2 cores a spinning sender would starve it); the sleep's
    /// overshoot makes it send the few messages then due back to back.
    pub fn wait_for(&self, sent: u64) {
        if self.rate <= 0.0 {
            return;
        }
        let at = self.start + Duration::from_secs_f64(sent as f64 / self.rate);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
    }

    /// Async version of [`wait_for`](Self::wait_for) for tasks: sleeps when
    /// more than a millisecond ahead.
    pub async fn wait_for_async(&self, sent: u64) {
        if self.rate <= 0.0 {
            return;
        }
        let at = self.start + Duration::from_secs_f64(sent as f64 / self.rate);
        let now = Instant::now();
        if at > now + Duration::from_millis(1) {
            tokio::time::sleep_until(at.into()).await;
        }
    }
}
