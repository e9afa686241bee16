//! Watching the config file and the files it names (certificates, keys, CAs).
//!
//! The directories are watched, not the files: editors save by writing a new
//! file and renaming it over the old one, and Kubernetes swaps a `..data`
//! symlink; both replace the file a watch on the file itself would follow.
//! An event wakes the supervisor when it can change a watched file: it names
//! one of them (a write, or a new file renamed over it), or an entry of
//! Kubernetes' atomic writer (`..data` and its kin), and it is not only an
//! open, a read or a close unwritten. Other files in the same directory (an
//! access log, say) wake nothing. The supervisor then compares a fingerprint
//! of the files' contents, so an event that changed nothing costs a read,
//! never a reload. A burst of events (an editor's save) is one wake-up: it
//! ends after `DEBOUNCE` of quiet.

use std::collections::HashSet;
use std::ffi::OsString;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

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
    /// The watched files' names, read by the watcher's own thread.
    names: Arc<ArcSwap<HashSet<OsString>>>,
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
        let names = Arc::new(ArcSwap::from_pointee(HashSet::new()));
        let watched = Arc::clone(&names);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|event| may_change(&event, &watched.load())) {
                // The receiver is gone only when the process is stopping.
                let _ = sender.send(());
            }
        })?;
        Ok(ConfigWatcher {
            watcher,
            dirs: HashSet::new(),
            names,
            events,
        })
    }

    /// Watches the directories of `files` (and stops watching the others).
    pub fn watch(&mut self, files: &[PathBuf]) {
        let names = files
            .iter()
            .filter_map(|file| file.file_name().map(OsString::from))
            .collect();
        self.names.store(Arc::new(names));
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

/// Whether an event can mean new contents for a file named in `names`.
/// Opening, reading and closing a file unwritten cannot, and the fingerprint
/// itself does all three: waking on them would read the files again and
/// again. An event without paths (the kernel's queue overflowed) may hide
/// anything.
fn may_change(event: &notify::Event, names: &HashSet<OsString>) -> bool {
    let writes = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    writes
        && (event.paths.is_empty()
            || event.paths.iter().any(|path| {
                path.file_name().is_some_and(|name| {
                    // Kubernetes swaps `..data` (and writes `..data_tmp`,
                    // `..2026_...`) to replace every file of a volume at once.
                    names.contains(name) || name.as_encoded_bytes().starts_with(b"..")
                })
            }))
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

    #[tokio::test]
    async fn other_files_in_the_directory_wake_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("flowgate.toml");
        std::fs::write(&file, "# one\n").expect("write");
        let mut watcher = ConfigWatcher::new().expect("watcher");
        watcher.watch(std::slice::from_ref(&file));

        // An access log beside the config, written to and replaced.
        let log = dir.path().join("access.log");
        std::fs::write(&log, "line\n").expect("write");
        std::fs::rename(&log, dir.path().join("access.log.1")).expect("rename");
        assert!(
            tokio::time::timeout(QUIET, watcher.changed())
                .await
                .is_err(),
            "woken by another file"
        );

        // A new config renamed over the old one, as editors save.
        let saved = dir.path().join(".flowgate.toml.swp");
        std::fs::write(&saved, "# two\n").expect("write");
        std::fs::rename(&saved, &file).expect("rename");
        tokio::time::timeout(DEADLINE, watcher.changed())
            .await
            .expect("a save wakes the watcher");
    }

    #[test]
    fn only_writes_to_watched_files_count() {
        use notify::event::{CreateKind, ModifyKind, RemoveKind, RenameMode};
        let names: HashSet<OsString> = [OsString::from("flowgate.toml")].into();
        let event = |kind, path: &str| notify::Event::new(kind).add_path(PathBuf::from(path));
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert!(
                !may_change(&event(kind, "/etc/flowgate/flowgate.toml"), &names),
                "{kind:?}"
            );
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(
                may_change(&event(kind, "/etc/flowgate/flowgate.toml"), &names),
                "{kind:?}"
            );
            assert!(
                !may_change(&event(kind, "/etc/flowgate/access.log"), &names),
                "{kind:?}"
            );
        }
        // Kubernetes' atomic writer renames `..data_tmp` to `..data`.
        let swap = notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path(PathBuf::from("/etc/flowgate/..data_tmp"))
            .add_path(PathBuf::from("/etc/flowgate/..data"));
        assert!(may_change(&swap, &names));
        // An overflowed queue names nothing.
        assert!(may_change(&notify::Event::new(EventKind::Other), &names));
    }
}
