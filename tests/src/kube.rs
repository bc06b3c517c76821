//! A real Kubernetes API server (etcd + kube-apiserver from `scripts/kube-fixture`) per test,
//! and the real `kubectl`/`helm` pointed at it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{HarnessError, IoContext, Result};
use crate::prereqs::{ci_enabled, verdict, Verdict};

/// How long one kubectl call may wait on the API server.
const KUBECTL_REQUEST_TIMEOUT: &str = "30s";

static NEXT_FIXTURE: AtomicU32 = AtomicU32::new(0);

/// `scripts/kube-fixture` in this checkout.
pub fn fixture_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("kube-fixture")
}

/// The binaries `scripts/kube-fixture paths` reports (empty values: not built/installed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeTools {
    pub etcd: Option<PathBuf>,
    pub kube_apiserver: Option<PathBuf>,
    pub kubectl: Option<PathBuf>,
    pub helm: Option<PathBuf>,
}

impl KubeTools {
    /// Asks the script where the cached binaries are, without building anything.
    pub fn cached() -> Result<KubeTools> {
        let script = fixture_script();
        let output = Command::new("bash")
            .arg(&script)
            .arg("paths")
            .output()
            .context(|| format!("running {} paths", script.display()))?;
        if !output.status.success() {
            return Err(command_failed(
                &format!("{} paths", script.display()),
                &output,
            ));
        }
        Ok(KubeTools::from_env_lines(&String::from_utf8_lossy(
            &output.stdout,
        )))
    }

    fn from_env_lines(text: &str) -> KubeTools {
        let values = parse_env_lines(text);
        let path = |key: &str| {
            values
                .get(key)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
        };
        KubeTools {
            etcd: path("ETCD"),
            kube_apiserver: path("KUBE_APISERVER"),
            kubectl: path("KUBECTL"),
            helm: path("HELM"),
        }
    }

    /// What the API-server fixture still lacks (etcd, kube-apiserver, kubectl).
    pub fn missing_for_apiserver(&self) -> Vec<String> {
        [
            ("etcd", &self.etcd),
            ("kube-apiserver", &self.kube_apiserver),
            ("kubectl", &self.kubectl),
        ]
        .into_iter()
        .filter(|(_, path)| path.is_none())
        .map(|(name, _)| name.to_string())
        .collect()
    }
}

/// A running etcd + kube-apiserver on loopback; stopped (and its directory removed, unless the
/// test is failing) on drop.
#[derive(Debug)]
pub struct KubeFixture {
    dir: PathBuf,
    kubeconfig: PathBuf,
    server_url: String,
    kubectl: PathBuf,
    helm: Option<PathBuf>,
    env: BTreeMap<String, String>,
}

/// A finished kubectl (or helm) run.
#[derive(Debug, Clone)]
pub struct CommandResult {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl KubeFixture {
    /// Starts a fixture for `test`. When the binaries are not built yet this prints
    /// `SKIPPED: ...` and returns `None`, or panics under `CI=true` (CI must never pass by
    /// skipping). A fixture that is built but fails to start always panics.
    pub fn start(test: &str) -> Option<KubeFixture> {
        let tools = match KubeTools::cached() {
            Ok(tools) => tools,
            Err(e) => panic!("{test}: asking scripts/kube-fixture for its binaries failed: {e}"),
        };
        let missing = tools.missing_for_apiserver();
        match verdict(test, &missing, ci_enabled()) {
            Verdict::Run => {}
            Verdict::Skip(message) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "{message} (build them with: scripts/kube-fixture build)"
                );
                return None;
            }
            Verdict::Fail(_) => panic!(
                "prerequisite missing under CI=true: {test} needs {} (build them with: scripts/kube-fixture build)",
                missing.join(", ")
            ),
        }
        match KubeFixture::try_start(test) {
            Ok(fixture) => Some(fixture),
            Err(e) => panic!("{test}: starting the Kubernetes API server fixture failed: {e}"),
        }
    }

    /// Starts a fixture, building missing binaries first (which can take many minutes).
    pub fn try_start(test: &str) -> Result<KubeFixture> {
        let short: String = test
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .take(16)
            .collect();
        let n = NEXT_FIXTURE.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("weft-kube-{short}-{}-{n}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .context(|| format!("removing stale {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;

        let script = fixture_script();
        let output = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .context(|| format!("running {} start", script.display()))?;
        if !output.status.success() {
            return Err(command_failed(
                &format!("{} start {}", script.display(), dir.display()),
                &output,
            ));
        }
        let env_path = dir.join("fixture.env");
        let env_text = std::fs::read_to_string(&env_path)
            .context(|| format!("reading {}", env_path.display()))?;
        let env = parse_env_lines(&env_text);
        let field = |key: &str| {
            env.get(key)
                .filter(|value| !value.is_empty())
                .cloned()
                .ok_or_else(|| {
                    HarnessError::invalid(
                        env_path.display().to_string(),
                        format!("{key} is missing"),
                    )
                })
        };
        let fixture = KubeFixture {
            kubeconfig: PathBuf::from(field("KUBECONFIG")?),
            server_url: field("KUBE_APISERVER_URL")?,
            kubectl: PathBuf::from(field("KUBECTL")?),
            helm: env
                .get("HELM")
                .filter(|value| !value.is_empty())
                .map(PathBuf::from),
            env,
            dir,
        };
        Ok(fixture)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// A value from `<dir>/fixture.env` (KUBE_CA_CERT, KUBE_SA_ISSUER, ETCD_URL, ...).
    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    pub fn helm_path(&self) -> Option<&Path> {
        self.helm.as_deref()
    }

    /// Runs `kubectl <args>` against the fixture; a non-zero exit is a result, not an error.
    pub fn kubectl(&self, args: &[&str]) -> Result<CommandResult> {
        self.kubectl_with_stdin(args, None)
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<CommandResult> {
        self.kubectl_with_stdin(&["apply", "-f", "-"], Some(yaml))
    }

    /// Like [`Self::apply`], but a rejection is an error that includes kubectl's message.
    pub fn apply_ok(&self, yaml: &str) -> Result<String> {
        let result = self.apply(yaml)?;
        if !result.success {
            return Err(HarnessError::CommandFailed {
                command: format!("kubectl apply -f - <<EOF\n{yaml}\nEOF"),
                status: "rejected".into(),
                stderr: result.stderr,
            });
        }
        Ok(result.stdout)
    }

    pub fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<CommandResult> {
        let mut command = Command::new(&self.kubectl);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg(format!("--request-timeout={KUBECTL_REQUEST_TIMEOUT}"))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let display = format!("kubectl {}", args.join(" "));
        let mut child = command.spawn().context(|| format!("starting {display}"))?;
        if let Some(text) = stdin {
            if let Some(mut pipe) = child.stdin.take() {
                pipe.write_all(text.as_bytes())
                    .context(|| format!("writing stdin of {display}"))?;
            }
        }
        let output = child
            .wait_with_output()
            .context(|| format!("waiting for {display}"))?;
        Ok(CommandResult {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// The end of the API server's log, for failure reports.
    pub fn apiserver_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("kube-apiserver.log")).unwrap_or_default();
        let start = log.len().saturating_sub(8 * 1024);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(log.len());
        log[start..].to_string()
    }
}

impl Drop for KubeFixture {
    fn drop(&mut self) {
        let script = fixture_script();
        match Command::new("bash")
            .arg(&script)
            .arg("stop")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "weft-e2e: stopping the kube fixture in {} failed:\n{}",
                self.dir.display(),
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(e) => eprintln!("weft-e2e: running {} stop: {e}", script.display()),
        }
        // A failing test keeps the logs (etcd.log, kube-apiserver.log) for the report.
        if std::thread::panicking() {
            eprintln!("weft-e2e: kube fixture logs kept in {}", self.dir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("weft-e2e: removing {}: {e}", self.dir.display());
        }
    }
}

fn command_failed(command: &str, output: &Output) -> HarnessError {
    HarnessError::CommandFailed {
        command: command.to_string(),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `KEY=VALUE` lines (the script's `paths` output and `fixture.env`); other lines are ignored.
fn parse_env_lines(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| {
            !key.is_empty() && key.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        })
        .map(|(key, value)| (key.to_string(), value.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_lines_parse_and_empty_paths_count_as_missing() {
        let tools = KubeTools::from_env_lines(
            "kube-fixture: noise\nETCD=/x/etcd\nKUBE_APISERVER=\nKUBECTL=/usr/bin/kubectl\nHELM=/h/helm\n",
        );
        assert_eq!(tools.etcd, Some(PathBuf::from("/x/etcd")));
        assert_eq!(tools.kube_apiserver, None);
        assert_eq!(
            tools.missing_for_apiserver(),
            vec!["kube-apiserver".to_string()]
        );
    }

    #[test]
    fn values_may_contain_equals_signs() {
        let env = parse_env_lines("KUBE_APISERVER_URL=https://127.0.0.1:1\nX=a=b\nlower=no\n");
        assert_eq!(env.get("X").map(String::as_str), Some("a=b"));
        assert!(!env.contains_key("lower"));
    }

    #[test]
    fn the_script_is_in_the_checkout() {
        assert!(fixture_script().is_file(), "{}", fixture_script().display());
    }
}
