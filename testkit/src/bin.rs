//! Finding the binaries the tests and `berth-loadtest local` start.
//!
//! A binary is looked for, in order: next to the running executable (cargo's
//! target directory, where `berth-loadtest` finds `berth`), in the project's
//! `.tools/bin` (where `scripts/install-deps.sh` puts Consul), in
//! `.tools/bin` two levels above the running executable (from
//! `target/<profile>/`), in `./.tools/bin`, then on `PATH`. A binary that is
//! nowhere is an error that says how to install it: tests never skip.

use std::fmt;
use std::path::{Path, PathBuf};

/// A binary that is nowhere to be found; its message says how to install it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingBin {
    /// The binary's file name.
    pub name: String,
}

impl fmt::Display for MissingBin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.name.as_str() {
            "redis-server" => "run `scripts/install-deps.sh` (installs Debian's redis-server)",
            "consul" => {
                "run `scripts/install-deps.sh` (Consul 1.8.7 from Debian 11, into .tools/bin)"
            }
            "chromium" => "run `scripts/install-deps.sh` (installs Debian's chromium)",
            "promtool" => {
                "run `scripts/install-deps.sh` (installs Debian's prometheus, which has promtool)"
            }
            _ => "`scripts/install-deps.sh` does not install it: build it or put it on PATH",
        };
        write!(
            f,
            "{} is not installed (looked next to this executable, in .tools/bin and on PATH): {how}",
            self.name
        )
    }
}

impl std::error::Error for MissingBin {}

impl From<MissingBin> for std::io::Error {
    fn from(m: MissingBin) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, m.to_string())
    }
}

/// The project's own `.tools/bin` (this crate sits one level below the
/// workspace root).
fn project_tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin")
}

/// Where binary `name` is (see the module's order), or why not.
pub fn find_bin(name: &str) -> Result<PathBuf, MissingBin> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let mut candidates = Vec::new();
    if let Some(d) = &exe_dir {
        candidates.push(d.join(name));
    }
    candidates.push(project_tools().join(name));
    if let Some(d) = &exe_dir {
        candidates.push(d.join("../../.tools/bin").join(name));
    }
    candidates.push(PathBuf::from(".tools/bin").join(name));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|p| p.join(name))
                    .find(|p| p.is_file())
            })
        })
        .ok_or_else(|| MissingBin {
            name: name.to_owned(),
        })
}

/// [`find_bin`], panicking with how to install a binary that is missing.
pub fn require_bin(name: &str) -> PathBuf {
    find_bin(name).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_says_how_to_install_it() {
        let e = find_bin("no-such-binary-berth-testkit").unwrap_err();
        assert!(e.to_string().contains("build it or put it on PATH"), "{e}");
        let consul = MissingBin {
            name: "consul".into(),
        };
        assert!(consul.to_string().contains("scripts/install-deps.sh"));
        let redis = MissingBin {
            name: "redis-server".into(),
        };
        assert!(redis.to_string().contains("scripts/install-deps.sh"));
    }

    #[test]
    fn a_binary_on_path_is_found() {
        // `sh` is on PATH on every machine the tests run on.
        assert!(find_bin("sh").unwrap().is_file());
    }
}
