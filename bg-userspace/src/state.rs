//! What survives the agent: the persisted state (`state.json`: active color, generation, canary,
//! so a reboot comes back the same) and the audit log (`audit.jsonl`, one JSON object per line).

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Persisted {
    pub active: String,
    pub previous: Option<String>,
    pub generation: u64,
    /// Share (per mille) of new flows sent to the other color, 0 when no canary.
    #[serde(default)]
    pub canary_permille: u32,
}

pub struct Store {
    dir: PathBuf,
    /// The background writer of `state.json` (see `save_in_background`).
    writer: std::sync::Mutex<Option<(std::sync::mpsc::Sender<Persisted>, std::thread::JoinHandle<()>)>>,
}

impl Store {
    /// Opens (and creates, mode 0700) the state directory.
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating state directory {} (config `state_dir`)", dir.display()))?;
        Ok(Store { dir: dir.to_owned(), writer: std::sync::Mutex::new(None) })
    }

    /// Hands the state to a background writer that always writes the latest one: a flip does
    /// not wait for the file (a create-write-rename costs a few hundred µs). The file matters
    /// after a reboot; an agent crash leaves the pinned data plane, which a restarted agent
    /// reads instead. `flush` waits for the writer.
    pub fn save_in_background(&self, state: Persisted) {
        let mut w = self.writer.lock().unwrap();
        if w.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<Persisted>();
            let store = Store { dir: self.dir.clone(), writer: std::sync::Mutex::new(None) };
            let handle = std::thread::spawn(move || {
                while let Ok(mut latest) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        latest = newer;
                    }
                    if let Err(e) = store.save(&latest) {
                        tracing::error!(error = %e, "could not persist the agent state; a reboot may come back on an older color");
                    }
                }
            });
            *w = Some((tx, handle));
        }
        let _ = w.as_ref().unwrap().0.send(state);
    }

    /// Waits until the background writer has written everything handed to it.
    pub fn flush(&self) {
        if let Some((tx, handle)) = self.writer.lock().unwrap().take() {
            drop(tx);
            let _ = handle.join();
        }
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn audit_path(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }

    pub fn load(&self) -> anyhow::Result<Option<Persisted>> {
        let path = self.state_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| {
                format!("{} is not a bg state file; move it away to start from the config", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the state atomically (temporary file, rename); not fsynced (a power loss may lose
    /// the latest flips: the data plane is gone then too, and the agent comes back on the color
    /// last written).
    pub fn save(&self, state: &Persisted) -> anyhow::Result<()> {
        let path = self.state_path();
        let tmp = self.dir.join("state.json.tmp");
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(state)?.as_bytes())?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        Ok(())
    }

    /// Appends one event to the audit log (with `time` and `unix_ms` added), one `write` per
    /// line; not fsynced per event (see `save`).
    pub fn audit(&self, mut event: serde_json::Value) -> anyhow::Result<()> {
        let now = SystemTime::now();
        if let Some(obj) = event.as_object_mut() {
            obj.insert("time".into(), humantime::format_rfc3339_millis(now).to_string().into());
            let ms = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
            obj.insert("unix_ms".into(), ms.into());
        }
        let path = self.audit_path();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening audit log {}", path.display()))?;
        let mut line = serde_json::to_string(&event)?;
        line.push('\n');
        f.write_all(line.as_bytes())?;
        Ok(())
    }

    /// The last `limit` audit events, oldest first.
    pub fn history(&self, limit: usize) -> anyhow::Result<Vec<serde_json::Value>> {
        let path = self.audit_path();
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut events: Vec<serde_json::Value> = BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect();
        let skip = events.len().saturating_sub(limit);
        Ok(events.split_off(skip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_audit_keeps_order() {
        let dir = std::env::temp_dir().join(format!("bg-state-test-{}", std::process::id()));
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.load().unwrap(), None);
        let s = Persisted { active: "green".into(), previous: Some("blue".into()), generation: 7, canary_permille: 0 };
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), Some(s.clone()));
        for generation in 8..20 {
            store.save_in_background(Persisted { generation, ..s.clone() });
        }
        store.flush();
        assert_eq!(store.load().unwrap().unwrap().generation, 19, "the latest state is written");
        for i in 0..5 {
            store.audit(serde_json::json!({"event": "flip", "generation": i})).unwrap();
        }
        let h = store.history(3).unwrap();
        assert_eq!(h.iter().map(|e| e["generation"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 3, 4]);
        assert!(h[0]["time"].as_str().unwrap().ends_with('Z'));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
