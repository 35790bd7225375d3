//! Energy per request, estimated: while an upstream has requests in flight
//! it draws its busy power, shared equally among them at each instant; a
//! request's joules are the sum of its shares over its lifetime. (Measured
//! power, when an upstream reports it, replaces the estimate upstream of
//! this.)

use std::collections::BTreeMap;
use std::time::Instant;

/// The in-flight requests of one upstream and the joules each has accrued.
#[derive(Debug, Clone)]
pub struct EnergyLedger {
    busy_watts: f64,
    last: Option<Instant>,
    in_flight: BTreeMap<u64, f64>,
}

impl EnergyLedger {
    /// A ledger for an upstream drawing `busy_watts` when busy.
    pub fn new(busy_watts: f64) -> Self {
        EnergyLedger {
            busy_watts,
            last: None,
            in_flight: BTreeMap::new(),
        }
    }

    /// Shares the energy since the last event among the requests in flight.
    fn settle(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let n = self.in_flight.len();
            if n > 0 {
                let share =
                    now.saturating_duration_since(last).as_secs_f64() * self.busy_watts / n as f64;
                for joules in self.in_flight.values_mut() {
                    *joules += share;
                }
            }
        }
        self.last = Some(now);
    }

    /// Request `id` started at `now`.
    pub fn start(&mut self, id: u64, now: Instant) {
        self.settle(now);
        self.in_flight.insert(id, 0.0);
    }

    /// Request `id` ended at `now`; its joules.
    pub fn finish(&mut self, id: u64, now: Instant) -> f64 {
        self.settle(now);
        self.in_flight.remove(&id).unwrap_or(0.0)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn busy_power_is_shared_among_requests_in_flight() {
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut ledger = EnergyLedger::new(100.0);
        ledger.start(1, at(0.0));
        ledger.start(2, at(1.0));
        // 0-1 s: request 1 alone (100 J); 1-3 s: shared (100 J each).
        let first = ledger.finish(1, at(3.0));
        assert!((first - 200.0).abs() < 1e-6, "{first}");
        // 3-4 s: request 2 alone again.
        let second = ledger.finish(2, at(4.0));
        assert!((second - 200.0).abs() < 1e-6, "{second}");
        assert_eq!(ledger.in_flight(), 0);
        // Idle time between requests is charged to nobody.
        ledger.start(3, at(10.0));
        let third = ledger.finish(3, at(10.5));
        assert!((third - 50.0).abs() < 1e-6, "{third}");
        assert_eq!(ledger.finish(99, at(11.0)), 0.0);
    }
}
