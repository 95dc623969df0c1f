//! Paths under a root, and nothing outside it.
//!
//! A [`SafeRoot`] is the canonical form of the directory the user chose. Everything below it
//! is reached through it: a relative name is joined and canonicalized again, and refused when
//! it leaves the root (through `..` or through a symlink that points elsewhere). A file is
//! opened by its canonical path and checked after opening to be the same regular file, so a
//! symlink swapped in between the check and the open is caught too.
//!
//! Names shown to people are relative to the root, `/`-separated ([`Warning::path`]); an
//! absolute path never appears in a warning, an error or a log line.

use crate::AgentError;
use std::ffi::OsString;
use std::fs::{File, Metadata};
use std::path::{Component, Path, PathBuf};

/// A file or record that was skipped, and why. `path` is relative to the root; `reason`
/// names no absolute path and quotes no content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub path: String,
    pub reason: String,
}

impl Warning {
    /// A warning, also logged at `warn` level (relative path and reason only).
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Warning {
        let warning = Warning { path: path.into(), reason: reason.into() };
        tracing::warn!(path = %warning.path, "skipped: {}", warning.reason);
        warning
    }
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// One entry of a directory listing under the root.
#[derive(Clone, Debug)]
pub struct DirItem {
    /// The name in its directory.
    pub name: OsString,
    /// Relative to the root, `/`-separated.
    pub rel: String,
    /// Where it really is (canonical, under the root).
    pub path: PathBuf,
    pub is_dir: bool,
    pub size: u64,
    pub mtime_ns: i64,
}

/// The directory a scan may not leave.
#[derive(Clone, Debug)]
pub struct SafeRoot {
    root: PathBuf,
}

impl SafeRoot {
    /// The root must exist and be a directory (a symlink to one is resolved first).
    pub fn new(root: &Path) -> Result<SafeRoot, AgentError> {
        let root = std::fs::canonicalize(root).map_err(|e| AgentError::Root(crate::error::AgentError::io("<root>", e).to_string()))?;
        if !root.is_dir() {
            return Err(AgentError::Root("not a directory".into()));
        }
        Ok(SafeRoot { root })
    }

    /// The canonical root. Never put it in a message.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The canonical path of `rel` (a `/`-separated path relative to the root), refused when
    /// it is absolute, climbs with `..`, or resolves (through symlinks) outside the root.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, AgentError> {
        let joined = self.join(rel)?;
        let real = std::fs::canonicalize(&joined).map_err(|e| AgentError::io(rel, e))?;
        if !real.starts_with(&self.root) {
            return Err(AgentError::Escape(rel.to_owned()));
        }
        Ok(real)
    }

    /// `rel` joined to the root without touching the disk; refused when it is not a plain
    /// relative path.
    pub fn join(&self, rel: &str) -> Result<PathBuf, AgentError> {
        let mut path = self.root.clone();
        for component in Path::new(rel).components() {
            match component {
                Component::Normal(part) => path.push(part),
                Component::CurDir => {}
                _ => return Err(AgentError::Escape(rel.to_owned())),
            }
        }
        Ok(path)
    }

    /// Opens the regular file `rel` for reading, after resolving it under the root.
    pub fn open(&self, rel: &str) -> Result<(File, Metadata), AgentError> {
        let real = self.resolve(rel)?;
        let file = File::open(&real).map_err(|e| AgentError::io(rel, e))?;
        let meta = file.metadata().map_err(|e| AgentError::io(rel, e))?;
        if !meta.is_file() {
            return Err(AgentError::Format(format!("{rel}: not a regular file")));
        }
        same_file_check(rel, &real, &meta)?;
        Ok((file, meta))
    }

    /// The entries of directory `rel` ("" for the root), sorted by name. A symlink is followed
    /// only to a file under the root; one that leads outside (or nowhere) is left out with a
    /// warning, and a symlink to a directory is left out (it would be walked twice, or loop).
    pub fn list(&self, rel: &str, warnings: &mut Vec<Warning>) -> Result<Vec<DirItem>, AgentError> {
        let dir = if rel.is_empty() { self.root.clone() } else { self.resolve(rel)? };
        let reader = std::fs::read_dir(&dir).map_err(|e| AgentError::io(display_dir(rel), e))?;
        let mut items = Vec::new();
        for entry in reader {
            let entry = entry.map_err(|e| AgentError::io(display_dir(rel), e))?;
            let name = entry.file_name();
            let child_rel = child(rel, &name);
            let Ok(kind) = entry.file_type() else {
                warnings.push(Warning::new(child_rel, "cannot be read"));
                continue;
            };
            let (path, meta) = if kind.is_symlink() {
                match std::fs::canonicalize(entry.path()) {
                    Err(_) => {
                        warnings.push(Warning::new(child_rel, "a symlink that leads nowhere"));
                        continue;
                    }
                    Ok(target) if !target.starts_with(&self.root) => {
                        warnings.push(Warning::new(child_rel, "a symlink that points outside the root; refused"));
                        continue;
                    }
                    Ok(target) => match std::fs::metadata(&target) {
                        Ok(meta) if meta.is_file() => (target, meta),
                        Ok(_) => {
                            tracing::debug!(path = %child_rel, "a symlink to a directory: not followed");
                            continue;
                        }
                        Err(_) => {
                            warnings.push(Warning::new(child_rel, "cannot be read"));
                            continue;
                        }
                    },
                }
            } else {
                match entry.metadata() {
                    Ok(meta) => (entry.path(), meta),
                    Err(_) => {
                        warnings.push(Warning::new(child_rel, "cannot be read"));
                        continue;
                    }
                }
            };
            if !meta.is_dir() && !meta.is_file() {
                continue;
            }
            items.push(DirItem {
                name,
                rel: child_rel,
                path,
                is_dir: meta.is_dir(),
                size: meta.len(),
                mtime_ns: mtime_ns(&meta),
            });
        }
        items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(items)
    }
}

/// Modification time in nanoseconds since the epoch (0 when the platform has none).
pub fn mtime_ns(meta: &Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// `rel/name`, `/`-separated.
pub fn child(rel: &str, name: &std::ffi::OsStr) -> String {
    let name = name.to_string_lossy();
    if rel.is_empty() {
        name.into_owned()
    } else {
        format!("{rel}/{name}")
    }
}

fn display_dir(rel: &str) -> &str {
    if rel.is_empty() {
        "."
    } else {
        rel
    }
}

#[cfg(unix)]
fn same_file_check(rel: &str, real: &Path, opened: &Metadata) -> Result<(), AgentError> {
    use std::os::unix::fs::MetadataExt as _;
    let now = std::fs::symlink_metadata(real).map_err(|e| AgentError::io(rel, e))?;
    if now.dev() != opened.dev() || now.ino() != opened.ino() {
        return Err(AgentError::Escape(rel.to_owned()));
    }
    Ok(())
}

#[cfg(not(unix))]
fn same_file_check(_rel: &str, _real: &Path, _opened: &Metadata) -> Result<(), AgentError> {
    Ok(())
}

/// Whether `rel` is a plain relative path (no root, no `..`, not empty): what an export may
/// write to under the directory it was given.
pub fn is_plain_relative(rel: &str) -> bool {
    !rel.is_empty()
        && !rel.contains('\\')
        && !rel.contains('\0')
        && Path::new(rel).components().all(|c| matches!(c, Component::Normal(_)))
}
