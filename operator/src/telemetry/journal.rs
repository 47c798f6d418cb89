//! The export journal: which reports this process exported, in a file, so that a restarted process (a container
//! restart keeps the pod's emptyDir) does not export them again before their object's status records them. The
//! ledger's record is otherwise in memory, and a kill between an export and the status write that records it would
//! count the report twice: once per report in that window.
//!
//! One line per fact, appended after the export succeeded and before anyone is told: `<unix ms> M <key>` (the
//! report's metrics went out) or `<unix ms> E <key>` (all of it went out). A write reaches the page cache, which a
//! killed process does not take with it; only a lost node loses it, and then the pod and its emptyDir go too.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Errors opening or writing the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("--export-journal {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// What the journal says about one report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fact {
    /// Its metrics went out; its spans may not have.
    MetricsExported,
    /// All of it went out.
    Exported,
}

/// A fact read back, with how long ago it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Recalled {
    pub key: String,
    pub fact: Fact,
    pub age: Duration,
}

/// Compact once this many lines were appended since the file was last rewritten.
const COMPACT_AFTER: usize = 200_000;

pub struct Journal {
    path: PathBuf,
    file: std::fs::File,
    appended: usize,
}

fn unix_ms(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_path_buf(), source }
}

impl Journal {
    /// Opens (or creates) the journal at `path` and returns the facts younger than `keep`, the newest per key; the
    /// file is rewritten with only those.
    pub fn open(path: &Path, keep: Duration) -> Result<(Self, Vec<Recalled>), JournalError> {
        let now = unix_ms(SystemTime::now());
        let mut facts: HashMap<String, (u128, Fact)> = HashMap::new();
        match std::fs::File::open(path) {
            Ok(file) => {
                for line in std::io::BufReader::new(file).lines() {
                    let line = line.map_err(io(path))?;
                    // A line cut short by a kill mid-write is skipped, as is anything else that does not parse.
                    let mut parts = line.splitn(3, ' ');
                    let (Some(at), Some(kind), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
                        continue;
                    };
                    let Ok(at) = at.parse::<u128>() else { continue };
                    let fact = match kind {
                        "M" => Fact::MetricsExported,
                        "E" => Fact::Exported,
                        _ => continue,
                    };
                    if now.saturating_sub(at) < keep.as_millis() {
                        let newest = facts.entry(key.to_string()).or_insert((at, fact));
                        if fact == Fact::Exported || newest.1 == Fact::MetricsExported {
                            *newest = (at.max(newest.0), fact);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(path)(e)),
        }
        let mut recalled: Vec<Recalled> = facts
            .into_iter()
            .map(|(key, (at, fact))| Recalled {
                key,
                fact,
                age: Duration::from_millis(u64::try_from(now.saturating_sub(at)).unwrap_or(u64::MAX)),
            })
            .collect();
        recalled.sort_by_key(|r| std::cmp::Reverse(r.age));
        let journal = Self::rewrite(path, &recalled)?;
        Ok((journal, recalled))
    }

    /// Replaces the file with `facts` (via a temporary file and a rename, so a kill leaves one or the other).
    fn rewrite(path: &Path, facts: &[Recalled]) -> Result<Self, JournalError> {
        let now = SystemTime::now();
        let mut text = String::new();
        for f in facts {
            let at = unix_ms(now.checked_sub(f.age).unwrap_or(UNIX_EPOCH));
            let kind = if f.fact == Fact::Exported { "E" } else { "M" };
            text.push_str(&format!("{at} {kind} {}\n", f.key));
        }
        let temporary = path.with_extension("rewrite");
        std::fs::write(&temporary, text).map_err(io(path))?;
        std::fs::rename(&temporary, path).map_err(io(path))?;
        let file = std::fs::OpenOptions::new().append(true).open(path).map_err(io(path))?;
        Ok(Self { path: path.to_path_buf(), file, appended: 0 })
    }

    /// Appends `fact` for each key, in one write.
    pub fn append<'a>(&mut self, fact: Fact, keys: impl Iterator<Item = &'a str>) -> Result<(), JournalError> {
        let at = unix_ms(SystemTime::now());
        let kind = if fact == Fact::Exported { "E" } else { "M" };
        let mut text = String::new();
        for key in keys {
            text.push_str(&format!("{at} {kind} {key}\n"));
            self.appended += 1;
        }
        self.file.write_all(text.as_bytes()).map_err(io(&self.path))
    }

    /// Whether enough was appended that the file should be rewritten with what is still remembered.
    pub fn wants_compaction(&self) -> bool {
        self.appended >= COMPACT_AFTER
    }

    /// Rewrites the file with `facts` (what the ledger still remembers).
    pub fn compact(&mut self, facts: &[Recalled]) -> Result<(), JournalError> {
        *self = Self::rewrite(&self.path, facts)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flowtel-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir.join("exports.journal")
    }

    #[test]
    fn facts_survive_a_reopen_the_newest_per_key_and_a_torn_line_is_skipped() {
        let path = path("reopen");
        let keep = Duration::from_secs(600);
        let (mut journal, recalled) = Journal::open(&path, keep).expect("open");
        assert!(recalled.is_empty());
        journal.append(Fact::MetricsExported, ["a", "b"].into_iter()).expect("append");
        journal.append(Fact::Exported, ["a"].into_iter()).expect("append");
        drop(journal);
        // A kill in the middle of a write leaves a line without its end.
        std::fs::OpenOptions::new().append(true).open(&path).expect("file").write_all(b"17").expect("torn");
        let (_, mut recalled) = Journal::open(&path, keep).expect("reopen");
        recalled.sort_by(|x, y| x.key.cmp(&y.key));
        let facts: Vec<(&str, Fact)> = recalled.iter().map(|r| (r.key.as_str(), r.fact)).collect();
        assert_eq!(facts, [("a", Fact::Exported), ("b", Fact::MetricsExported)]);
        // The rewrite kept exactly those two facts.
        assert_eq!(std::fs::read_to_string(&path).expect("read").lines().count(), 2);
    }

    #[test]
    fn facts_older_than_kept_are_forgotten_and_compaction_rewrites_the_file() {
        let path = path("expire");
        let old = unix_ms(SystemTime::now() - Duration::from_secs(3600));
        std::fs::write(&path, format!("{old} E stale\nnot a line\n")).expect("write");
        let (mut journal, recalled) = Journal::open(&path, Duration::from_secs(600)).expect("open");
        assert_eq!(recalled, []);
        journal.append(Fact::Exported, ["x", "y", "z"].into_iter()).expect("append");
        let keep = [Recalled { key: "z".into(), fact: Fact::Exported, age: Duration::from_secs(1) }];
        journal.compact(&keep).expect("compact");
        journal.append(Fact::MetricsExported, ["w"].into_iter()).expect("append");
        let (_, recalled) = Journal::open(&path, Duration::from_secs(600)).expect("reopen");
        let keys: Vec<&str> = recalled.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["z", "w"], "oldest first");
    }
}
