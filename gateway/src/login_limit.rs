//! A cap on how often one device id may log in to this gateway.
//!
//! Every login of an id replaces the session before it, so two clients sharing an id (a cloned
//! device, a stolen token) replace each other in a loop, and firmware stuck in a reconnect loop
//! logs in as fast as the network allows: each login costs claim round trips on NATS, a
//! presence event pair, and a disconnect for whoever held the id. Past `max_logins_per_id`
//! logins (HELLOs past the token and denylist checks) within `login_window_s`, further logins
//! of that id are refused
//! `overloaded` until the window ends, which stops both loops while the id stays usable. The
//! count is per gateway: behind a balancer a loop spread over N gateways is cut after N times
//! the limit, which is still a bound.
//!
//! State is kept only for ids that logged in recently, keyed by a keyed hash of the id (8
//! bytes, not the id); windows that ended are dropped at the first login after them. Checking
//! and counting are one step under one lock, so logins of one id arriving together cannot all
//! pass before any is counted.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

use crate::contract::DeviceId;

/// Welcomed logins of one id in its current window.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Second the window started.
    start_s: u64,
    /// Logins counted in it.
    logins: u32,
}

/// Login counts per device id over fixed windows.
#[derive(Debug)]
pub(crate) struct LoginLimit {
    /// Logins allowed per id and window; 0: no limit.
    max: u32,
    window_s: u64,
    hasher: std::collections::hash_map::RandomState,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    windows: HashMap<u64, Window>,
    /// When expired windows were last dropped.
    pruned_s: u64,
}

impl LoginLimit {
    /// At most `max` logins per id every `window_s` seconds (`max` 0: unlimited).
    pub(crate) fn new(max: u32, window_s: u64) -> Self {
        LoginLimit {
            max,
            window_s: window_s.max(1),
            hasher: std::collections::hash_map::RandomState::new(),
            state: Mutex::new(State::default()),
        }
    }

    /// Counts a login of `id` at `now_s` if it is within the limit; `Err(seconds)`: refused,
    /// and not before its window ends (a refused login is not counted).
    pub(crate) fn admit(&self, id: &DeviceId, now_s: u64) -> Result<(), u64> {
        if self.max == 0 {
            return Ok(());
        }
        let key = self.hasher.hash_one(id);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let window_s = self.window_s;
        let w = state.windows.entry(key).or_insert(Window {
            start_s: now_s,
            logins: 0,
        });
        if now_s >= w.start_s + window_s {
            *w = Window {
                start_s: now_s,
                logins: 0,
            };
        }
        if w.logins >= self.max {
            return Err(w.start_s + window_s - now_s);
        }
        w.logins += 1;
        // Once per window, forget ids whose window is over: the table holds only recent logins.
        if now_s >= state.pruned_s + window_s {
            state.pruned_s = now_s;
            state.windows.retain(|_, w| now_s < w.start_s + window_s);
            state.windows.shrink_to_fit();
        }
        Ok(())
    }

    /// Ids with a window open (for tests and the memory bound).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .windows
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("valid id")
    }

    #[test]
    fn an_id_over_its_logins_waits_for_its_window_and_others_do_not() {
        let limit = LoginLimit::new(3, 60);
        for _ in 0..3 {
            assert_eq!(limit.admit(&id("loop"), 100), Ok(()));
        }
        assert_eq!(limit.admit(&id("loop"), 100), Err(60));
        assert_eq!(limit.admit(&id("loop"), 159), Err(1));
        assert_eq!(limit.admit(&id("other"), 100), Ok(()), "per id");
        // A new window starts at the first login after the old one ended.
        assert_eq!(limit.admit(&id("loop"), 160), Ok(()));
        assert_eq!(limit.admit(&id("loop"), 161), Ok(()));
        assert_eq!(limit.admit(&id("loop"), 162), Ok(()));
        assert_eq!(limit.admit(&id("loop"), 163), Err(57));
    }

    #[test]
    fn zero_means_no_limit() {
        let limit = LoginLimit::new(0, 60);
        for _ in 0..100 {
            assert_eq!(limit.admit(&id("d"), 5), Ok(()));
        }
        assert_eq!(limit.tracked(), 0, "nothing is kept");
    }

    #[test]
    fn windows_that_ended_are_forgotten() {
        let limit = LoginLimit::new(5, 60);
        for n in 0..1000 {
            assert_eq!(limit.admit(&id(&format!("d{n}")), 10), Ok(()));
        }
        assert_eq!(limit.tracked(), 1000);
        assert_eq!(limit.admit(&id("late"), 71), Ok(()));
        assert_eq!(limit.tracked(), 1, "only the window still open is kept");
    }
}
