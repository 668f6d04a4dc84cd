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

impl Persisted {
    /// Every field in range: colors by name, a canary share a flip can set (1 to 99%, per
    /// mille), a generation that can still count up.
    pub fn check(&self) -> Result<(), String> {
        let color = |s: &str| matches!(s, "blue" | "green");
        if !color(&self.active) {
            return Err(format!("active = {:?}, not \"blue\" or \"green\"", self.active));
        }
        if let Some(p) = self.previous.as_deref().filter(|p| !color(p)) {
            return Err(format!("previous = {p:?}, not \"blue\" or \"green\""));
        }
        if self.canary_permille != 0 && !(10..=990).contains(&self.canary_permille) {
            return Err(format!("canary_permille = {}, not 0 or 10 to 990", self.canary_permille));
        }
        if self.generation == 0 || self.generation > MAX_GENERATION {
            return Err(format!("generation = {}, not 1 to {MAX_GENERATION}", self.generation));
        }
        Ok(())
    }
}

/// Generations count flips; 2^53 (exact in every JSON reader) is beyond any real count.
pub const MAX_GENERATION: u64 = 1 << 53;

pub struct Store {
    dir: PathBuf,
    /// The background writer of `state.json` (see `save_in_background`).
    writer: std::sync::Mutex<Option<(std::sync::mpsc::Sender<Persisted>, std::thread::JoinHandle<()>)>>,
    /// The audit log, open for appending.
    audit_log: std::sync::Mutex<Option<File>>,
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
        Ok(Store { dir: dir.to_owned(), writer: std::sync::Mutex::new(None), audit_log: std::sync::Mutex::new(None) })
    }

    /// Hands the state to a background writer that always writes the latest one: a flip does
    /// not wait for the file (a create-write-rename costs a few hundred µs). The file matters
    /// after a reboot; an agent crash leaves the pinned data plane, which a restarted agent
    /// reads instead. `flush` waits for the writer.
    pub fn save_in_background(&self, state: Persisted) {
        let mut w = crate::lock(&self.writer);
        if w.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<Persisted>();
            let store = Store { dir: self.dir.clone(), writer: std::sync::Mutex::new(None), audit_log: std::sync::Mutex::new(None) };
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
        if let Some((tx, handle)) = crate::lock(&self.writer).take() {
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

    /// Reads `state.json`, if there is one. A file that is not a whole, valid state (empty
    /// after a power loss, edited, from elsewhere) is refused with what is wrong and how to
    /// recover; nothing is guessed.
    pub fn load(&self) -> anyhow::Result<Option<Persisted>> {
        let path = self.state_path();
        let recover = format!(
            "move it away (`mv {p} {p}.bad`) to start from the config's initial_color; a pinned data plane, \
             if there is one, keeps its active color",
            p = path.display()
        );
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}; {recover}", path.display())),
        };
        if text.trim().is_empty() {
            anyhow::bail!("{} is empty (cut short by a crash or power loss?); {recover}", path.display());
        }
        let p: Persisted = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bg state file; {recover}", path.display()))?;
        if let Err(what) = p.check() {
            anyhow::bail!("{} holds an invalid state ({what}); {recover}", path.display());
        }
        Ok(Some(p))
    }

    /// Writes the state so that a crash or power loss at any moment leaves the old file or the
    /// new one, whole: a fresh temporary file (`O_EXCL|O_NOFOLLOW`: never through a link
    /// planted there), fsynced, renamed over `state.json`, and the directory fsynced.
    pub fn save(&self, state: &Persisted) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.state_path();
        let tmp = self.dir.join("state.json.tmp");
        // A temporary file left by a crash mid-write (or anything else put there) goes first.
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(state)?.as_bytes())?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing directory {}", self.dir.display()))?;
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
        let mut line = serde_json::to_string(&event)?;
        line.push('\n');
        // Opened once and kept (a flip pays one write, not a path walk and an open).
        let mut log = crate::lock(&self.audit_log);
        if log.is_none() {
            let path = self.audit_path();
            *log = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening audit log {}", path.display()))?,
            );
        }
        let f = log.as_mut().expect("opened above");
        if let Err(e) = f.write_all(line.as_bytes()) {
            // Opened again next time (the file may have been rotated away or its disk filled).
            *log = None;
            return Err(e).with_context(|| format!("appending to {}", self.audit_path().display()));
        }
        Ok(())
    }
}

/// The last `limit` events of the audit log at `path`, oldest first. Keeps only `limit` lines
/// in memory whatever the log's length (it grows for the agent's life); needs no lock of the
/// agent's.
pub fn read_history(path: &Path, limit: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut last = std::collections::VecDeque::with_capacity(limit.min(4096));
    for line in BufReader::new(f).lines().map_while(Result::ok) {
        if last.len() == limit {
            last.pop_front();
        }
        last.push_back(line);
    }
    // A line that does not parse (cut by a crash mid-write) is left out.
    Ok(last.iter().filter_map(|l| serde_json::from_str(l).ok()).collect())
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
        let h = read_history(&store.audit_path(), 3).unwrap();
        assert_eq!(h.iter().map(|e| e["generation"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 3, 4]);
        assert!(h[0]["time"].as_str().unwrap().ends_with('Z'));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every state file that is not a whole, valid state is refused, naming what is wrong and
    /// how to recover; nothing is guessed from it.
    #[test]
    fn bad_state_files_are_refused_with_the_way_out() {
        let dir = std::env::temp_dir().join(format!("bg-state-bad-{}", std::process::id()));
        let store = Store::open(&dir).unwrap();
        let good = r#"{"active": "green", "previous": "blue", "generation": 7, "canary_permille": 0}"#;
        std::fs::write(store.state_path(), good).unwrap();
        assert_eq!(store.load().unwrap().unwrap().generation, 7);
        for (text, why) in [
            ("", "is empty"),
            ("\n  \n", "is empty"),
            ("{\"active\": \"gre", "not a bg state file"),
            ("[1, 2]", "not a bg state file"),
            (r#"{"previous": null, "generation": 3}"#, "not a bg state file"),
            (r#"{"active": "red", "previous": null, "generation": 3}"#, "active = \"red\""),
            (r#"{"active": "blue", "previous": "purple", "generation": 3}"#, "previous = \"purple\""),
            (r#"{"active": "blue", "previous": null, "generation": 0}"#, "generation = 0"),
            (r#"{"active": "blue", "previous": null, "generation": 18446744073709551615}"#, "generation = 18446744073709551615"),
            (r#"{"active": "blue", "previous": null, "generation": -1}"#, "not a bg state file"),
            (r#"{"active": "blue", "previous": null, "generation": 3, "canary_permille": 1000}"#, "canary_permille = 1000"),
            (r#"{"active": "blue", "previous": null, "generation": 3, "canary_permille": 5}"#, "canary_permille = 5"),
        ] {
            std::fs::write(store.state_path(), text).unwrap();
            let e = format!("{:#}", store.load().expect_err(text));
            assert!(e.contains(why) && e.contains(".bad`") && e.contains("initial_color"), "{text:?}: expected `{why}` in: {e}");
        }
        // A link planted at the temporary file's name is replaced, never written through.
        let victim = dir.join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("state.json.tmp")).unwrap();
        store.save(&Persisted { active: "blue".into(), previous: None, generation: 9, canary_permille: 0 }).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(store.load().unwrap().unwrap().generation, 9);
        assert!(!dir.join("state.json.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn field() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("\"blue\"".to_owned()), Just("\"green\"".to_owned()), Just("\"\"".to_owned()), Just("null".to_owned()),
                Just("0".to_owned()), Just("-1".to_owned()), Just("1.5".to_owned()), Just("[]".to_owned()), Just("{}".to_owned()),
                Just("18446744073709551615".to_owned()), Just("18446744073709551616".to_owned()), Just("9007199254740993".to_owned()),
                any::<u64>().prop_map(|n| n.to_string()), any::<u32>().prop_map(|n| n.to_string()),
                "[a-z]{0,8}".prop_map(|s| format!("\"{s}\"")),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]
            /// State files with any mix of present, missing and odd fields, cut anywhere:
            /// loading never panics, and a loaded state passes every check.
            #[test]
            fn odd_state_files_never_panic_and_loaded_ones_are_valid(
                fields in proptest::collection::vec((0..5usize, field()), 0..6),
                cut in any::<prop::sample::Index>(),
            ) {
                let names = ["active", "previous", "generation", "canary_permille", "extra"];
                let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{}\": {v}", names[*k])).collect();
                let mut text = format!("{{{}}}", body.join(", "));
                if cut.index(4) == 0 {
                    text.truncate(cut.index(text.len() + 1));
                }
                let dir = std::env::temp_dir().join(format!("bg-state-fuzz-{}-{:?}", std::process::id(), std::thread::current().id()));
                let store = Store::open(&dir).unwrap();
                std::fs::write(store.state_path(), &text).unwrap();
                if let Ok(Some(p)) = store.load() {
                    prop_assert!(p.check().is_ok(), "{text}");
                }
                std::fs::remove_dir_all(&dir).unwrap();
            }
        }
    }
}
