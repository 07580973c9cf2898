//! Imports share the library; deleting unreferenced chunks needs it alone.
//!
//! A reader-writer lock whose shared side is a plain value: an import holds
//! one while its chunks are written on another thread than the one that
//! began it (std's lock guards must stay on their thread).

use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    /// Imports running.
    shared: usize,
    /// A collection running.
    exclusive: bool,
    /// Collections waiting: new imports wait behind them, so a steady
    /// stream of imports cannot starve one.
    waiting: usize,
}

#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

/// Held by an import.
pub(crate) struct Shared<'g>(&'g Gate);

/// Held while unreferenced chunks are deleted.
pub(crate) struct Exclusive<'g>(&'g Gate);

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'s>(&self, s: MutexGuard<'s, State>) -> MutexGuard<'s, State> {
        self.changed.wait(s).unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no collection runs or waits, then holds the gate shared.
    pub(crate) fn shared(&self) -> Shared<'_> {
        let mut s = self.lock();
        while s.exclusive || s.waiting > 0 {
            s = self.wait(s);
        }
        s.shared += 1;
        Shared(self)
    }

    /// Waits until nothing holds the gate, then holds it alone.
    pub(crate) fn exclusive(&self) -> Exclusive<'_> {
        let mut s = self.lock();
        s.waiting += 1;
        while s.exclusive || s.shared > 0 {
            s = self.wait(s);
        }
        s.waiting -= 1;
        s.exclusive = true;
        Exclusive(self)
    }

    /// Holds the gate alone if nothing holds it now.
    pub(crate) fn try_exclusive(&self) -> Option<Exclusive<'_>> {
        let mut s = self.lock();
        if s.exclusive || s.shared > 0 {
            return None;
        }
        s.exclusive = true;
        Some(Exclusive(self))
    }
}

impl Drop for Shared<'_> {
    fn drop(&mut self) {
        self.0.lock().shared -= 1;
        self.0.changed.notify_all();
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        self.0.lock().exclusive = false;
        self.0.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn exclusive_waits_for_shared_and_shared_waits_behind_a_waiting_exclusive() {
        let gate = Gate::default();
        let first = gate.shared();
        assert!(gate.try_exclusive().is_none(), "an import runs");
        let collected = AtomicBool::new(false);
        let second_began = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _x = gate.exclusive();
                collected.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                assert!(!second_began.load(Ordering::SeqCst), "alone while held");
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!collected.load(Ordering::SeqCst), "waits for the import");
            s.spawn(|| {
                let _s = gate.shared();
                assert!(collected.load(Ordering::SeqCst), "queued behind it");
                second_began.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!second_began.load(Ordering::SeqCst));
            drop(first);
        });
        assert!(second_began.load(Ordering::SeqCst));
        assert!(gate.try_exclusive().is_some(), "free again");
    }
}
