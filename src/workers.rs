//! Extra worker threads for `global.threads` > 1, each with a single-threaded
//! runtime of its own (thread per core, as nginx runs a process per core).
//!
//! Every listener accepts on the main runtime and on every worker. An accepted
//! connection goes to the serving thread with the fewest connections (the one
//! that accepted it on a tie, see [`ServingThreads`]) and is served there
//! start to end, so the hot path crosses no thread: no shared run queue, no
//! cross-thread wake-up. What all threads share (the running config, server
//! pools, counters) is lock-free or behind short per-server locks.

use std::cell::Cell;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

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

/// The serving threads of a process, as the accept loops see them: each
/// thread's runtime and how many connections it serves now.
///
/// Every thread's accept loop wakes for a new connection and the first to
/// accept it wins, which says nothing about how busy that thread is: with
/// two threads, 64 keep-alive clients connecting at once were served 94 to 6
/// by CPU time in one run (`/proc/PID/task/*/stat`), so the second thread
/// sat idle. The accepting thread therefore hands each connection to the
/// thread with the fewest (itself on a tie), as HAProxy's accept queues
/// balance its threads. A hand-off is one task spawned onto the other
/// thread's runtime, once per connection; the requests on it stay there.
#[derive(Debug)]
pub struct ServingThreads {
    threads: Box<[ServingThread]>,
}

#[derive(Debug)]
struct ServingThread {
    handle: Handle,
    connections: Counter,
}

/// One thread's connection count, alone on its cache line: every accept
/// reads all of them, and every connection's end writes one.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Counter(AtomicUsize);

/// A connection's place on the thread chosen to serve it: counted there until
/// this is dropped (when the connection's task ends, or is dropped unrun).
/// The counts are `flowgate_thread_connections` in the metrics.
#[derive(Debug)]
pub struct Assigned {
    threads: Arc<ServingThreads>,
    index: usize,
}

impl Assigned {
    /// The thread chosen.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for Assigned {
    fn drop(&mut self) {
        let counter = &self.threads.threads[self.index].connections;
        counter.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServingThreads {
    /// The serving threads, indexed as given: the first thread's runtime,
    /// then each worker's ([`Workers::handles`]).
    pub fn new(handles: impl IntoIterator<Item = Handle>) -> Arc<ServingThreads> {
        let threads = handles
            .into_iter()
            .map(|handle| ServingThread {
                handle,
                connections: Counter::default(),
            })
            .collect();
        Arc::new(ServingThreads { threads })
    }

    /// How many serving threads there are: 0 is the first, the workers follow.
    pub fn count(&self) -> usize {
        self.threads.len()
    }

    /// How many connections each thread serves now, in thread order.
    pub fn connections(&self) -> Vec<usize> {
        let counts = self.threads.iter();
        counts
            .map(|thread| thread.connections.0.load(Ordering::Relaxed))
            .collect()
    }

    /// Chooses the thread to serve a connection that thread `me` accepted:
    /// the one with the fewest connections, `me` when it is among them.
    pub fn assign(self: &Arc<Self>, me: usize) -> Assigned {
        let count = |index: usize| self.threads[index].connections.0.load(Ordering::Relaxed);
        let me = me.min(self.threads.len() - 1);
        let mut chosen = (me, count(me));
        for index in 0..self.threads.len() {
            let connections = count(index);
            if connections < chosen.1 {
                chosen = (index, connections);
            }
        }
        let index = chosen.0;
        self.threads[index]
            .connections
            .0
            .fetch_add(1, Ordering::Relaxed);
        Assigned {
            threads: Arc::clone(self),
            index,
        }
    }

    /// Makes thread `index`'s runtime the current one until the guard drops,
    /// so that a socket created meanwhile registers with its I/O driver
    /// (from whichever thread: the driver is shared safely).
    pub fn enter(&self, index: usize) -> tokio::runtime::EnterGuard<'_> {
        self.threads[index].handle.enter()
    }

    /// Runs `task` on thread `on` (for a connection, its [`Assigned::index`]),
    /// tracked by `tracker`.
    pub fn spawn<F>(&self, on: usize, tracker: &TaskTracker, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.threads[on].handle.spawn(tracker.track_future(task));
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

    /// A runtime's handle for tests that only count: its thread is never used.
    fn idle_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_connection_goes_to_the_thread_serving_fewest_the_acceptor_on_a_tie() {
        let runtimes: Vec<_> = (0..3).map(|_| idle_runtime()).collect();
        let threads = ServingThreads::new(runtimes.iter().map(|rt| rt.handle().clone()));
        // All idle: the thread that accepted serves it.
        let first = threads.assign(2);
        assert_eq!(first.index(), 2);
        // Thread 2 accepts on: the others have fewer, lowest index first.
        let mut chosen: Vec<_> = (0..5).map(|_| threads.assign(2)).collect();
        let indices: Vec<_> = chosen.iter().map(Assigned::index).collect();
        assert_eq!(indices, [0, 1, 2, 0, 1]);
        assert_eq!(threads.connections(), [2, 2, 2]);
        // A connection on thread 1 ends: its next one goes there.
        drop(chosen.remove(1));
        assert_eq!(threads.connections(), [2, 1, 2]);
        assert_eq!(threads.assign(0).index(), 1);
        // An accept loop's index past the end is clamped, not a panic.
        drop(first);
        assert_eq!(threads.assign(7).index(), 2);
    }

    #[test]
    fn a_single_thread_serves_everything_and_counts_it() {
        let runtime = idle_runtime();
        let threads = ServingThreads::new([runtime.handle().clone()]);
        let (first, second) = (threads.assign(0), threads.assign(0));
        assert_eq!((first.index(), second.index()), (0, 0));
        assert_eq!(threads.connections(), [2]);
        drop((first, second));
        assert_eq!(threads.connections(), [0]);
    }

    #[test]
    fn an_assigned_task_runs_on_its_thread_and_is_uncounted_when_it_ends() {
        let workers = Workers::start(2).expect("start workers");
        let threads = ServingThreads::new(workers.handles().iter().cloned());
        let tracker = TaskTracker::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let (mut ran_on, mut releases) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let assigned = threads.assign(0);
            let on = assigned.index();
            let (tx, (release, released)) = (tx.clone(), oneshot::channel::<()>());
            releases.push(release);
            // Holds its place until released, as a connection until it closes.
            threads.spawn(on, &tracker, async move {
                let _ = tx.send((assigned.index(), slot()));
                let _ = released.await;
                drop(assigned);
            });
            let ran = rx.recv_timeout(std::time::Duration::from_secs(5));
            ran_on.push(ran.expect("the task ran"));
        }
        // Index 0 is the first worker (slot 1), index 1 the second (slot 2).
        assert_eq!(ran_on, [(0, 1), (1, 2)]);
        assert_eq!(threads.connections(), [1, 1]);
        drop(releases);
        tracker.close();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while threads.connections() != [0, 0] {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                threads.connections()
            );
            std::thread::yield_now();
        }
    }
}
