//! `weft inject`: adds the proxy to the pods and pod templates of YAML read on stdin and
//! writes the result to stdout, with the same library (and the same proxy flags) as the
//! `weft-injector` webhook. Namespace annotations are not visible offline, so every pod
//! template is injected unless it says `weft.io/inject: disabled`.

use std::io::{Read, Write};

use anyhow::Context;
use weft_injector::ProxyArgs;

#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    #[command(flatten)]
    proxy: ProxyArgs,
    /// Inject the proxy as a native sidecar (init container with restartPolicy: Always,
    /// Kubernetes ≥ 1.29) or, with `false`, as a regular container with a post-start hook.
    /// A pod's `config.weft.io/native-sidecar` annotation wins.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    native_sidecar: bool,
}

pub fn run(args: &InjectArgs) -> anyhow::Result<()> {
    let settings = args.proxy.settings()?;
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading YAML from stdin")?;
    let (output, reports) =
        weft_injector::manifest::inject_yaml(&input, &settings, args.native_sidecar)?;
    std::io::stdout()
        .write_all(output.as_bytes())
        .context("writing to stdout")?;
    let mut stderr = std::io::stderr();
    for report in reports {
        let verdict = if report.injected {
            "injected"
        } else {
            "skipped"
        };
        let _ = writeln!(stderr, "{} {verdict} ({})", report.object, report.detail);
    }
    Ok(())
}
