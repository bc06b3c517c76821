//! Prerequisite checks (root, system tools): skip loudly locally, fail under `CI=true`.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Directories searched for tools in addition to `$PATH`: root's tools live in sbin, which
/// some environments leave out of `$PATH`.
const EXTRA_TOOL_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Proof that a test's prerequisites were checked and are present.
#[derive(Debug, Clone, Copy)]
pub struct Prereqs(());

/// What to do about a test given its missing prerequisites.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Run,
    Skip(String),
    Fail(String),
}

impl Prereqs {
    /// Checks for root and `tools`. Returns `None` (after printing `SKIPPED: ...` to stderr)
    /// when something is missing; panics instead when `CI=true`, because CI must never pass
    /// by skipping.
    pub fn require(test: &str, tools: &[&str]) -> Option<Prereqs> {
        match verdict(test, &missing(tools), ci_enabled()) {
            Verdict::Run => Some(Prereqs(())),
            Verdict::Skip(message) => {
                // Straight to the stderr handle: libtest captures `eprintln!` of passing tests,
                // and a skip must never be silent.
                let _ = writeln!(std::io::stderr(), "{message}");
                None
            }
            Verdict::Fail(message) => panic!("{message}"),
        }
    }
}

/// Skips the calling test (returning `Ok(())`) unless root and the tools are present.
/// For tests returning `Result<(), _>`; see [`crate::e2e_test`] for the usual entry point.
#[macro_export]
macro_rules! require_prereqs {
    ($test:expr, $tools:expr) => {
        match $crate::Prereqs::require($test, $tools) {
            ::core::option::Option::Some(prereqs) => prereqs,
            ::core::option::Option::None => return ::core::result::Result::Ok(()),
        }
    };
}

pub fn ci_enabled() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// Root (if we are not root) and each tool not found, in the order given.
pub fn missing(tools: &[&str]) -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    missing.extend(
        tools
            .iter()
            .filter(|tool| find_tool(tool).is_none())
            .map(|tool| tool.to_string()),
    );
    missing
}

pub fn verdict(test: &str, missing: &[String], ci: bool) -> Verdict {
    if missing.is_empty() {
        Verdict::Run
    } else if ci {
        Verdict::Fail(format!(
            "prerequisite missing under CI=true: {test} needs {} (run scripts/setup-test-deps as root)",
            missing.join(", ")
        ))
    } else {
        Verdict::Skip(format!("SKIPPED: {test} needs {}", missing.join("/")))
    }
}

/// The full path of an executable named `tool`, searching `$PATH` and then the sbin/bin dirs.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    path_dirs
        .iter()
        .map(PathBuf::as_path)
        .chain(EXTRA_TOOL_DIRS.iter().map(Path::new))
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_missing_runs() {
        assert_eq!(verdict("t", &[], true), Verdict::Run);
        assert_eq!(verdict("t", &[], false), Verdict::Run);
    }

    #[test]
    fn missing_locally_skips_and_names_what() {
        let missing = vec!["root".to_string(), "tcpdump".to_string()];
        assert_eq!(
            verdict("mesh_tcp", &missing, false),
            Verdict::Skip("SKIPPED: mesh_tcp needs root/tcpdump".to_string())
        );
    }

    #[test]
    fn missing_under_ci_fails_and_names_what() {
        let missing = vec!["tcpdump".to_string()];
        let Verdict::Fail(message) = verdict("mesh_tcp", &missing, true) else {
            panic!("expected a failure under CI");
        };
        assert!(message.starts_with("prerequisite missing under CI=true: mesh_tcp needs tcpdump"));
    }

    #[test]
    fn finds_sh_and_not_a_made_up_tool() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("weft-no-such-tool-xyz").is_none());
    }
}
