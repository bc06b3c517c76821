//! Where the workspace's binaries are: `$WEFT_BIN_DIR`, else the cargo target dir the test
//! executable itself was built into.

use std::path::PathBuf;

use crate::error::{HarnessError, Result};

/// The path of workspace binary `name` (e.g. `weft-proxy`), which must already be built.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::MissingBinary {
            name: name.to_string(),
            path,
        })
    }
}

/// `$WEFT_BIN_DIR`, else two levels above the running test executable
/// (`target/debug/deps/<test>-<hash>` → `target/debug`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("WEFT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().map_err(|error| HarnessError::Io {
        context: "finding the test executable".to_string(),
        error,
    })?;
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .ok_or_else(|| {
            HarnessError::invalid(
                "test executable path",
                format!("{} has no grandparent directory", exe.display()),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_says_how_to_build_it() {
        let err = bin("weft-no-such-binary").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("weft-no-such-binary"), "{message}");
        assert!(
            message.contains("cargo build --workspace --bins"),
            "{message}"
        );
    }
}
