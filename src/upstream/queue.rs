//! The backend queue: requests (and tcp sessions) waiting for a server slot when
//! every usable server is at its `max_connections`.
//!
//! Strict FIFO: a slot freed by a finishing request is handed straight to the
//! oldest waiter (the in-flight count does not drop and rise again, so no new
//! arrival can take it in between), and new arrivals queue behind existing
//! waiters. The lock is per backend and only taken when limits are reached;
//! the request path without limits never touches it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use super::InFlightGuard;

#[derive(Debug, Default)]
pub struct Queue {
    waiters: Mutex<VecDeque<oneshot::Sender<InFlightGuard>>>,
    /// Waiters now (kept beside the list so the fast path reads one atomic).
    len: AtomicUsize,
}

/// Why a queued request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    Full,
    Timeout,
}

impl Queue {
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Joins the queue, unless `max` are already waiting.
    pub fn join(&self, max: usize) -> Result<oneshot::Receiver<InFlightGuard>, QueueError> {
        let mut waiters = self.lock();
        if waiters.len() >= max {
            return Err(QueueError::Full);
        }
        let (sender, receiver) = oneshot::channel();
        waiters.push_back(sender);
        self.len.store(waiters.len(), Ordering::Release);
        Ok(receiver)
    }

    /// Offers a slot to the oldest waiter still waiting. Returns the slot when
    /// nobody takes it.
    pub fn hand_over(&self, mut slot: InFlightGuard) -> Option<InFlightGuard> {
        loop {
            let waiter = {
                let mut waiters = self.lock();
                let waiter = waiters.pop_front();
                self.len.store(waiters.len(), Ordering::Release);
                waiter
            };
            let Some(waiter) = waiter else {
                return Some(slot);
            };
            match waiter.send(slot) {
                Ok(()) => return None,
                // That waiter gave up (timed out, client gone): the next one.
                Err(returned) => slot = returned,
            }
        }
    }

    /// Drops waiters that gave up, so the length stays true.
    pub fn prune(&self) {
        let mut waiters = self.lock();
        waiters.retain(|waiter| !waiter.is_closed());
        self.len.store(waiters.len(), Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<oneshot::Sender<InFlightGuard>>> {
        // Every critical section is a single push, pop or retain: a panic cannot
        // leave the list half-changed.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
