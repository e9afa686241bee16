//! What a balancer derives from the server set (a schedule, a ring, a sampling
//! table), published as one immutable value and rebuilt when the backend's epoch
//! moves.
//!
//! A pick loads the epoch and the current table: two atomic reads, no lock, no
//! shared reference count. The first pick that sees a newer epoch rebuilds; the
//! picks that run meanwhile on other threads keep the previous table, which is
//! only ever stale for the instant a change takes (picks re-check the server
//! they settle on).

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::{ArcSwap, Guard};

#[derive(Debug)]
pub(crate) struct Derived<T> {
    epoch: Arc<AtomicU64>,
    current: ArcSwap<Stamped<T>>,
    rebuilding: AtomicBool,
}

#[derive(Debug)]
pub(crate) struct Stamped<T> {
    epoch: u64,
    value: T,
}

/// A loaded table; derefs to it.
pub(crate) struct Table<T>(Guard<Arc<Stamped<T>>>);

impl<T> Deref for Table<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0.value
    }
}

impl<T> Derived<T> {
    /// Builds the first table at once, so no pick ever finds none.
    pub fn new(epoch: Arc<AtomicU64>, build: impl FnOnce() -> T) -> Derived<T> {
        let current = epoch.load(Ordering::Acquire);
        Derived {
            current: ArcSwap::from_pointee(Stamped {
                epoch: current,
                value: build(),
            }),
            epoch,
            rebuilding: AtomicBool::new(false),
        }
    }

    /// The table for the current epoch, rebuilt with `build` when it is out of
    /// date (unless another thread is rebuilding it right now).
    #[inline]
    pub fn load(&self, build: impl FnOnce() -> T) -> Table<T> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let table = self.current.load();
        if table.epoch == epoch {
            return Table(table);
        }
        drop(table);
        self.rebuild(epoch, build);
        Table(self.current.load())
    }

    #[cold]
    fn rebuild(&self, epoch: u64, build: impl FnOnce() -> T) {
        if self
            .rebuilding
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        // The epoch was read before the servers' state: a change that lands
        // while building makes the table look stale, so it is built again.
        self.current.store(Arc::new(Stamped {
            epoch,
            value: build(),
        }));
        self.rebuilding.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuilds_only_when_the_epoch_moves() {
        let epoch = Arc::new(AtomicU64::new(7));
        let builds = std::cell::Cell::new(0);
        let build = || {
            builds.set(builds.get() + 1);
            builds.get()
        };
        let derived = Derived::new(Arc::clone(&epoch), build);
        assert_eq!(*derived.load(build), 1);
        assert_eq!(*derived.load(build), 1);
        epoch.fetch_add(1, Ordering::AcqRel);
        assert_eq!(*derived.load(build), 2);
        assert_eq!(*derived.load(build), 2);
        assert_eq!(builds.get(), 2);
    }
}
