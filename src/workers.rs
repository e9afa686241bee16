//! Extra worker threads for `global.threads` > 1, each with a single-threaded
//! runtime of its own (thread per core, as nginx runs a process per core).
//!
//! Every listener accepts on the main runtime and on every worker; a
//! connection is served start to end on the thread that accepted it, so the
//! hot path crosses no thread: no shared run queue, no cross-thread wake-up.
//! What all threads share (the running config, server pools, counters) is
//! lock-free or behind short per-server locks.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// Serving threads of the process: the first thread and the workers.
static SLOTS: AtomicUsize = AtomicUsize::new(1);

/// Which serving thread runs the caller: 0 on the first thread (and any thread
/// that is not a worker), `1..` on the workers. What is kept per thread (idle
/// server connections) is indexed by it, so that a connection is used only on
/// the thread whose runtime drives it.
#[inline]
pub fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// How many serving threads there are: [`slot`] is below it.
pub fn slots() -> usize {
    SLOTS.load(Ordering::Relaxed)
}

/// Scheduler ticks (task polls) between two looks for new I/O events and
/// expired timers while tasks are ready to run; when none is, the runtime
/// looks at once. tokio's default is 61: under load, every 61 polls it made
/// a system call for the few events that had come since. At 1,000 it takes
/// them in larger batches and makes most of those calls no longer, as an
/// event loop like HAProxy's runs its ready tasks before it polls again.
/// `benches/ab.sh`, 1,000 against 61, both under load at once: h2 0.939
/// (0.933–0.951) of the CPU per request, TLS keep-alive 0.973, 16 KiB 0.980,
/// ka-100 0.987, close and new TLS handshakes 0.998 and 1.004, p99 within
/// the noise. A tick is a few microseconds, so a look is at most a few
/// milliseconds away even on a thread that never runs out of work.
const EVENT_INTERVAL: u32 = 1_000;

/// The runtime of a serving thread (the first thread's and every worker's):
/// single-threaded, with I/O and timers.
pub fn serving_runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .event_interval(EVENT_INTERVAL)
        .build()
}

/// Running worker threads; dropping this stops them (what still runs on them
/// is dropped) and waits for them to end.
#[derive(Debug, Default)]
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Workers {
    /// Starts `count` worker threads.
    pub fn start(count: usize) -> io::Result<Workers> {
        let mut workers = Workers::default();
        SLOTS.fetch_max(count + 1, Ordering::Relaxed);
        for index in 1..=count {
            let runtime = serving_runtime()?;
            let (stop, stopped) = oneshot::channel::<()>();
            workers.handles.push(runtime.handle().clone());
            let thread = std::thread::Builder::new()
                .name(format!("flowgate-worker-{index}"))
                .spawn(move || {
                    SLOT.with(|slot| slot.set(index));
                    // Runs the tasks spawned onto this runtime until told to stop.
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            workers.threads.push((stop, thread));
        }
        Ok(workers)
    }

    /// The workers' runtimes, to spawn accept loops onto.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (stop, thread) in self.threads.drain(..) {
            let _ = stop.send(());
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_their_worker_thread_until_the_workers_stop() {
        let workers = Workers::start(2).expect("start workers");
        let names: Vec<String> = workers
            .handles()
            .iter()
            .map(|handle| {
                let (tx, rx) = std::sync::mpsc::channel();
                handle.spawn(async move {
                    let name = std::thread::current().name().map(str::to_owned);
                    let _ = tx.send(format!("{} {}", name.unwrap_or_default(), slot()));
                });
                rx.recv_timeout(std::time::Duration::from_secs(5))
                    .expect("the task ran")
            })
            .collect();
        // Each worker knows its slot; this thread is not a worker.
        assert_eq!(names, ["flowgate-worker-1 1", "flowgate-worker-2 2"]);
        assert_eq!(slot(), 0);
        assert!(slots() >= 3);

        // A task still pending when the workers stop is dropped, not leaked.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        workers.handles()[0].spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        drop(workers);
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
            "the pending task was dropped with its runtime"
        );
    }
}
