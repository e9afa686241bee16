//! The state file (`global.state_file`): admin states and weights set through
//! the API, so they survive a restart as they survive a reload.
//!
//! ```json
//! {"backends": {"engines": {"engine-1": {"state": "drain"}, "engine-2": {"state": "ready", "weight": 0}}}}
//! ```
//!
//! Only servers whose state is not `ready`, or whose weight was set through the
//! API, are listed. The file is rewritten whole after every change (written to a
//! temporary file in the same directory, synced, renamed over the old one), so a
//! crash leaves either the old or the new file, never a torn one. It is read once
//! at start, before any check runs or client is accepted; entries for servers
//! the config does not have are ignored, and a file that cannot be read is
//! logged and ignored.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::runtime::Runtime;
use crate::upstream::AdminState;

/// The highest weight the config and the API accept.
pub const MAX_WEIGHT: u32 = 256;

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// backend name -> server name -> saved state.
    #[serde(default)]
    pub backends: BTreeMap<String, BTreeMap<String, SavedServer>>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SavedServer {
    pub state: SavedState,
    /// A weight set through the API; absent when the config's applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SavedState {
    Ready,
    Drain,
    Maint,
}

impl From<AdminState> for SavedState {
    fn from(state: AdminState) -> SavedState {
        match state {
            AdminState::Ready => SavedState::Ready,
            AdminState::Drain => SavedState::Drain,
            AdminState::Maint => SavedState::Maint,
        }
    }
}

impl From<SavedState> for AdminState {
    fn from(state: SavedState) -> AdminState {
        match state {
            SavedState::Ready => AdminState::Ready,
            SavedState::Drain => AdminState::Drain,
            SavedState::Maint => AdminState::Maint,
        }
    }
}

impl StateFile {
    /// What the running snapshot's servers carry that the config does not say.
    pub fn capture(runtime: &Runtime) -> StateFile {
        let mut backends = BTreeMap::new();
        for backend in runtime.backends() {
            let servers: BTreeMap<String, SavedServer> = backend
                .servers
                .iter()
                .filter_map(|server| {
                    let state = server.state.admin_state();
                    let weight = server.state.weight_override();
                    (state != AdminState::Ready || weight.is_some()).then(|| {
                        let saved = SavedServer {
                            state: state.into(),
                            weight,
                        };
                        (server.name.to_string(), saved)
                    })
                })
                .collect();
            if !servers.is_empty() {
                backends.insert(backend.name.to_string(), servers);
            }
        }
        StateFile { backends }
    }

    /// Sets the saved states on the servers of `runtime` that exist; returns
    /// how many servers took a saved state.
    pub fn apply(&self, runtime: &Runtime) -> usize {
        let mut applied = 0;
        for (backend_name, servers) in &self.backends {
            let Some(backend) = runtime.backend(backend_name) else {
                tracing::info!(backend = %backend_name, "state file: backend not in the config, ignored");
                continue;
            };
            for (server_name, saved) in servers {
                let Some(server) = backend.server(server_name) else {
                    tracing::info!(
                        "state file: {backend_name}/{server_name} not in the config, ignored"
                    );
                    continue;
                };
                let weight = match saved.weight {
                    Some(weight) if weight > MAX_WEIGHT => {
                        tracing::warn!(
                            "state file: {backend_name}/{server_name}: weight {weight} is above {MAX_WEIGHT}, ignored"
                        );
                        None
                    }
                    weight => weight,
                };
                server.state.set_admin_state(saved.state.into());
                server.state.set_weight_override(weight);
                tracing::info!(
                    state = ?saved.state,
                    weight = ?weight,
                    "state file: {backend_name}/{server_name} restored"
                );
                applied += 1;
            }
        }
        applied
    }

    pub fn to_json(&self) -> String {
        // A map of plain structs always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

/// Reads the state file and applies it to `runtime`. A missing file is a first
/// start; a file that cannot be read or parsed is logged and ignored.
pub fn restore(path: &Path, runtime: &Runtime) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "no state file yet");
            return;
        }
        Err(err) => {
            tracing::error!(path = %path.display(), error = %err, "cannot read the state file; starting without it");
            return;
        }
    };
    match serde_json::from_str::<StateFile>(&text) {
        Ok(saved) => {
            let applied = saved.apply(runtime);
            tracing::info!(path = %path.display(), servers = applied, "state file loaded");
        }
        Err(err) => {
            tracing::error!(path = %path.display(), error = %err, "state file is corrupt; starting without it");
        }
    }
}

/// Replaces the file at `path` with `contents` atomically: a temporary file in
/// the same directory, synced, then renamed over it, and the directory synced
/// so the rename itself is durable.
pub fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    // Not every file system lets a directory be synced; the rename is done.
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_format_round_trips() {
        let text = r#"{"backends": {"engines": {"a": {"state": "drain"}, "b": {"state": "ready", "weight": 0}}}}"#;
        let parsed: StateFile = serde_json::from_str(text).expect("parses");
        assert_eq!(
            parsed.backends["engines"]["a"],
            SavedServer {
                state: SavedState::Drain,
                weight: None
            }
        );
        assert_eq!(parsed.backends["engines"]["b"].weight, Some(0));
        let again: StateFile = serde_json::from_str(&parsed.to_json()).expect("parses again");
        assert_eq!(again, parsed);
        assert!(
            serde_json::from_str::<StateFile>(r#"{"backends": {"e": {"a": {"state": "up"}}}}"#)
                .is_err()
        );
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        write_atomically(&path, b"one").expect("first write");
        write_atomically(&path, b"two").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .map(|entry| entry.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("state.json")]);
    }
}
