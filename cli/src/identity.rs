//! `weft identity --out <dir>`: a new trust anchor and the issuer it signs. The anchor's
//! private key is never written: to rotate, generate a new anchor and trust both.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::install::pki;

#[derive(clap::Args, Debug)]
pub struct IdentityArgs {
    /// Directory to write trust-anchors.pem, issuer.pem and issuer-key.pem into.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Trust anchor lifetime in days.
    #[arg(long, default_value_t = pki::ANCHOR_DAYS)]
    pub anchor_days: u64,
    /// Issuer lifetime in days.
    #[arg(long, default_value_t = pki::ISSUER_DAYS)]
    pub issuer_days: u64,
    /// Replace files that already exist.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &IdentityArgs) -> anyhow::Result<()> {
    if args.issuer_days > args.anchor_days {
        bail!(
            "--issuer-days ({}) must not exceed --anchor-days ({})",
            args.issuer_days,
            args.anchor_days
        );
    }
    let generated = weft_certs::generate_identity(
        &args.trust_domain,
        pki::days(args.anchor_days),
        pki::days(args.issuer_days),
    )?;
    write_identity(&args.out, &generated, args.force)?;
    println!(
        "wrote {0}/trust-anchors.pem, {0}/issuer.pem, {0}/issuer-key.pem (trust domain {1})",
        args.out.display(),
        args.trust_domain
    );
    Ok(())
}

pub fn write_identity(
    dir: &Path,
    generated: &weft_certs::GeneratedIdentity,
    force: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_file(
        &dir.join("trust-anchors.pem"),
        &generated.trust_anchors_pem,
        0o644,
        force,
    )?;
    write_file(&dir.join("issuer.pem"), &generated.issuer_pem, 0o644, force)?;
    // The issuer key is a secret: readable by its owner only.
    write_file(
        &dir.join("issuer-key.pem"),
        &generated.issuer_key_pem,
        0o600,
        force,
    )?;
    Ok(())
}

fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).with_context(|| {
        format!(
            "writing {} (use --force to replace an existing file)",
            path.display()
        )
    })?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
