//! Watching the config file and the files it names (certificates, keys, CAs).
//!
//! The directories are watched, not the files: editors save by writing a new
//! file and renaming it over the old one, and Kubernetes swaps a `..data`
//! symlink; both replace the file a watch on the file itself would follow.
//! Every event in a watched directory that can change a file (not opening,
//! reading or closing one unwritten) only wakes the supervisor, which then
//! compares a fingerprint of the files' contents, so unrelated files in the same
//! directory cost a read, never a reload. A burst of events (an editor's save)
//! is one wake-up: it ends after `DEBOUNCE` of quiet.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet time that ends a burst of file events.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// A steady stream of events still yields a reload this often.
const MAX_DEBOUNCE: Duration = Duration::from_millis(500);

pub struct ConfigWatcher {
    watcher: RecommendedWatcher,
    dirs: HashSet<PathBuf>,
    events: mpsc::UnboundedReceiver<()>,
}

impl std::fmt::Debug for ConfigWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatcher")
            .field("dirs", &self.dirs)
            .finish()
    }
}

impl ConfigWatcher {
    pub fn new() -> notify::Result<ConfigWatcher> {
        let (sender, events) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|event| may_change(&event.kind)) {
                // The receiver is gone only when the process is stopping.
                let _ = sender.send(());
            }
        })?;
        Ok(ConfigWatcher {
            watcher,
            dirs: HashSet::new(),
            events,
        })
    }

    /// Watches the directories of `files` (and stops watching the others).
    pub fn watch(&mut self, files: &[PathBuf]) {
        let wanted: HashSet<PathBuf> = files.iter().map(|file| directory_of(file)).collect();
        for dir in self.dirs.difference(&wanted) {
            let _ = self.watcher.unwatch(dir);
        }
        let mut watching = HashSet::new();
        for dir in wanted {
            if self.dirs.contains(&dir) {
                watching.insert(dir);
                continue;
            }
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watching.insert(dir);
                }
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), error = %err, "cannot watch directory for changes")
                }
            }
        }
        self.dirs = watching;
    }

    /// Completes after a burst of events in the watched directories has ended.
    pub async fn changed(&mut self) {
        if self.events.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
        let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(DEBOUNCE, self.events.recv()).await {
                Ok(Some(())) => continue,
                _ => break,
            }
        }
    }
}

/// Whether an event can mean new contents. Opening, reading and closing a
/// file unwritten cannot, and the fingerprint itself does all three: waking
/// on them would read the files again and again.
fn may_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn directory_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A fingerprint of the files' contents (a missing file counts as empty), to
/// tell a real change from an unrelated event.
pub fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for file in files {
        file.hash(&mut hasher);
        std::fs::read(file).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long a watcher that should stay asleep is watched: several
    /// debounce periods, the time a wake-up on the fingerprint's own reads
    /// took to show.
    const QUIET: Duration = Duration::from_millis(400);
    const DEADLINE: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn reading_the_files_wakes_nothing_and_writing_them_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("flowgate.toml");
        std::fs::write(&file, "# one\n").expect("write");
        let files = vec![file.clone()];
        let mut watcher = ConfigWatcher::new().expect("watcher");
        watcher.watch(&files);

        let before = fingerprint(&files);
        assert!(
            tokio::time::timeout(QUIET, watcher.changed())
                .await
                .is_err(),
            "woken by its own read of the files"
        );

        std::fs::write(&file, "# two\n").expect("write");
        tokio::time::timeout(DEADLINE, watcher.changed())
            .await
            .expect("a write wakes the watcher");
        assert_ne!(fingerprint(&files), before);
    }

    #[test]
    fn only_reads_are_ignored() {
        use notify::event::{CreateKind, ModifyKind, RenameMode};
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert!(!may_change(&kind), "{kind:?}");
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(notify::event::RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(may_change(&kind), "{kind:?}");
        }
    }
}
