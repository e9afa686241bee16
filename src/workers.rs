//! Extra worker threads for `global.threads` > 1, each with a single-threaded
//! runtime of its own (thread per core, as nginx runs a process per core).
//!
//! Every listener accepts on the main runtime and on every worker; a
//! connection is served start to end on the thread that accepted it, so the
//! hot path crosses no thread: no shared run queue, no cross-thread wake-up.
//! What all threads share (the running config, server pools, counters) is
//! lock-free or behind short per-server locks.

use std::io;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

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
        for index in 1..=count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            workers.handles.push(runtime.handle().clone());
            let thread = std::thread::Builder::new()
                .name(format!("flowgate-worker-{index}"))
                .spawn(move || {
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
                    let _ = tx.send(name.unwrap_or_default());
                });
                rx.recv_timeout(std::time::Duration::from_secs(5))
                    .expect("the task ran")
            })
            .collect();
        assert_eq!(names, ["flowgate-worker-1", "flowgate-worker-2"]);

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
