//! Passive signals: what sessions saw on live traffic, waiting for the checker's verdict.
//!
//! A session's trouble is evidence, not a verdict. [`Evidence::report`] records it and wakes
//! the member's checker, which probes the member on a fresh connection and publishes a
//! [`Verdict`] covering every report made before the probe began. A session that needs the
//! answer (its member closed its connection: a failure, or a healthy member that meant it)
//! waits for the first verdict whose `covers` reaches its ticket. Thousands of reports at once
//! (a killed member, a reconnect storm) cost one probe, and nothing is queued per report.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{watch, Notify};

use crate::member::Signal;

/// A report's place in line: the verdict of a probe that began after it answers it.
pub type Ticket = u64;

/// The outcome of a confirming probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Every report with a ticket up to this one is answered.
    pub covers: Ticket,
    /// The probe succeeded: the member serves, the trouble was the session's own.
    pub healthy: bool,
}

/// The passive signals of one member.
pub struct Evidence {
    /// Reports so far; a report's ticket is the count after it.
    reported: AtomicU64,
    /// Reports per kind not yet covered by a probe (for counts by kind and outcome).
    pending: [AtomicU64; Signal::KINDS],
    wake: Notify,
    verdicts: watch::Sender<Verdict>,
}

impl Default for Evidence {
    fn default() -> Evidence {
        Evidence {
            reported: AtomicU64::new(0),
            pending: Default::default(),
            wake: Notify::new(),
            verdicts: watch::Sender::new(Verdict {
                covers: 0,
                healthy: true,
            }),
        }
    }
}

impl Evidence {
    /// A session saw `signal`: the checker will probe. Returns the report's ticket.
    pub fn report(&self, signal: Signal) -> Ticket {
        self.pending[signal.index()].fetch_add(1, Ordering::Relaxed);
        let ticket = self.reported.fetch_add(1, Ordering::AcqRel) + 1;
        self.wake.notify_one();
        ticket
    }

    /// Where verdicts are published (subscribe before reporting, so none is missed).
    pub fn verdicts(&self) -> watch::Receiver<Verdict> {
        self.verdicts.subscribe()
    }

    /// The checker's wait for a report.
    pub async fn reported(&self) {
        self.wake.notified().await
    }

    /// The checker begins a probe: the reports it will answer, and their count per kind.
    pub fn take(&self) -> (Ticket, [u64; Signal::KINDS]) {
        let covers = self.reported.load(Ordering::Acquire);
        let counts = std::array::from_fn(|i| self.pending[i].swap(0, Ordering::Relaxed));
        (covers, counts)
    }

    /// The checker's answer to the reports up to `covers`.
    pub fn decide(&self, covers: Ticket, healthy: bool) {
        self.verdicts.send_replace(Verdict { covers, healthy });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_answers_the_reports_made_before_its_probe() {
        let e = Evidence::default();
        let verdicts = e.verdicts();
        let first = e.report(Signal::ConnectionLost);
        let second = e.report(Signal::ConnectionLost);
        let (covers, counts) = e.take();
        assert_eq!((first, second, covers), (1, 2, 2));
        assert_eq!(counts[Signal::ConnectionLost.index()], 2);
        let late = e.report(Signal::ReplyTimeout);
        e.decide(covers, false);
        let v = *verdicts.borrow();
        assert!(v.covers >= second && !v.healthy);
        assert!(
            v.covers < late,
            "a report after the probe began waits for the next one"
        );
        let (covers, counts) = e.take();
        assert_eq!(covers, 3);
        assert_eq!(counts[Signal::ReplyTimeout.index()], 1);
        assert_eq!(counts[Signal::ConnectionLost.index()], 0);
    }
}
