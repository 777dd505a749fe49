//! A cap on how often one kind of event is logged.
//!
//! Some log lines can be caused at will by whoever reaches a port (a refused login is one).
//! Logging each of them lets a flood of bad connections fill disks and hide everything else;
//! logging none leaves an operator blind to a misconfigured device. So a few per second are
//! logged, and the number left out is carried on the next line that is.

use std::sync::Mutex;

/// Admits at most `per_second` lines per wall-clock second.
#[derive(Debug)]
pub(crate) struct LogBudget {
    per_second: u32,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// The second the count is for.
    second: u64,
    /// Lines admitted in it.
    used: u32,
    /// Lines left out since the last admitted one.
    suppressed: u64,
}

impl LogBudget {
    /// A budget of `per_second` lines per second.
    pub(crate) fn new(per_second: u32) -> Self {
        LogBudget {
            per_second,
            state: Mutex::new(Window::default()),
        }
    }

    /// Whether to log a line now (`now_s`: seconds of any monotonic or wall clock). `Some(n)`:
    /// log it, mentioning the `n` lines left out before it; `None`: leave it out.
    pub(crate) fn admit(&self, now_s: u64) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if w.second != now_s {
            w.second = now_s;
            w.used = 0;
        }
        if w.used >= self.per_second {
            w.suppressed += 1;
            return None;
        }
        w.used += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_lines_per_second_and_the_rest_are_counted_on_the_next() {
        let budget = LogBudget::new(2);
        assert_eq!(budget.admit(10), Some(0));
        assert_eq!(budget.admit(10), Some(0));
        assert_eq!(budget.admit(10), None);
        assert_eq!(budget.admit(10), None);
        // The next second's first line says how many were left out.
        assert_eq!(budget.admit(11), Some(2));
        assert_eq!(budget.admit(11), Some(0));
        assert_eq!(budget.admit(11), None);
        // A quiet gap does not lose the count either.
        assert_eq!(budget.admit(20), Some(1));
    }
}
