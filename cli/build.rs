//! Embeds the Helm chart's CRDs and Grafana dashboards into `weft install`, so the binary
//! renders exactly what `charts/weft` holds: every file of those two directories, found
//! here rather than listed by hand, so a new dashboard cannot be left out of one of them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    // Read at run time: a build script compiled for one checkout may be reused by cargo
    // for another sharing the target directory, and `env!` would point it at the first.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let chart = Path::new(&manifest_dir).join("../charts/weft");
    let mut out = String::new();
    for (constant, dir, ext) in [
        ("CHART_CRDS", "crds", "yaml"),
        ("CHART_DASHBOARDS", "dashboards", "json"),
    ] {
        let dir = chart.join(dir);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| path.extension().is_some_and(|e| e == ext))
                .collect(),
            Err(e) => panic!("reading {}: {e}", dir.display()),
        };
        files.sort();
        let _ = writeln!(out, "pub const {constant}: &[(&str, &str)] = &[");
        for path in files {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            println!("cargo:rerun-if-changed={}", path.display());
            let _ = writeln!(
                out,
                "    ({name:?}, include_str!({:?})),",
                path.display().to_string()
            );
        }
        let _ = writeln!(out, "];");
    }
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap_or_default()).join("chart_files.rs");
    if let Err(e) = std::fs::write(&dest, out) {
        panic!("writing {}: {e}", dest.display());
    }
}
