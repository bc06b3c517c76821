//! `weft-proxy init`: installs the nat rules that send the pod's TCP traffic through the
//! proxy (inbound to the inbound port, outbound to the outbound port).
//!
//! Rules live in weft's own `WEFT_*` chains and are applied with `iptables-restore
//! --noflush`, so nothing else on the node is touched and running init again rewrites
//! weft's chains instead of stacking copies.

mod backend;
mod rules;

use std::io::{self, Write};

pub use backend::Backend;
pub use rules::{
    parse_cidrs, parse_ports, render_rules, restore_input, Cidr, InterceptConfig, IpFamily,
    INBOUND_CHAIN, INBOUND_REDIRECT_CHAIN, OUTPUT_CHAIN, OUTPUT_REDIRECT_CHAIN, WEFT_CHAINS,
};

/// Which iptables backend to program.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesMode {
    /// Use the backend that already holds rules (nft when neither does).
    Auto,
    /// iptables-nft (nf_tables kernel API).
    Nft,
    /// iptables-legacy (x_tables kernel API).
    Legacy,
}

/// Options of `weft-proxy init`.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// UID the proxy runs as; its own connections are never redirected.
    #[arg(long, default_value_t = 2170)]
    pub proxy_uid: u32,
    /// Port of the proxy's inbound listener (target of inbound redirects).
    #[arg(long, default_value_t = 7143, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// Port of the proxy's outbound listener (target of outbound redirects).
    #[arg(long, default_value_t = 7140, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// Port of the proxy's admin server (never redirected).
    #[arg(long, default_value_t = 7191, value_parser = clap::value_parser!(u16).range(1..))]
    pub admin_port: u16,
    /// Inbound ports that bypass the proxy, comma separated (e.g. "22,8081").
    #[arg(long, value_name = "PORTS")]
    pub skip_inbound_ports: Vec<String>,
    /// Outbound destination ports that bypass the proxy, comma separated.
    #[arg(long, value_name = "PORTS")]
    pub skip_outbound_ports: Vec<String>,
    /// Outbound destination networks that bypass the proxy, comma separated; IPv4 ones go
    /// to iptables, IPv6 ones to ip6tables.
    #[arg(long, value_name = "CIDRS")]
    pub skip_outbound_cidrs: Vec<String>,
    /// Which iptables backend to program.
    #[arg(long, value_enum, default_value_t = IptablesMode::Auto)]
    pub iptables_mode: IptablesMode,
    /// Print the iptables-restore input for each family and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also program ip6tables (skipped with a note where IPv6 or ip6tables is missing).
    /// Off by default: the proxy listens on IPv4 only today, so redirecting IPv6 would turn
    /// dual-stack traffic that now passes unmeshed into refused connections.
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub ipv6: bool,
}

/// Why `weft-proxy init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("invalid port {value:?} in {flag}: expected a number from 1 to 65535")]
    InvalidPort { flag: &'static str, value: String },
    #[error("invalid CIDR {value:?} in --skip-outbound-cidrs: {reason}")]
    InvalidCidr { value: String, reason: String },
    #[error("{first} and {second} are both {port}; the proxy's ports must differ")]
    ConflictingPorts {
        first: &'static str,
        second: &'static str,
        port: u16,
    },
    #[error("{binary} not found in PATH or /usr/sbin, /sbin; install iptables or pick another --iptables-mode")]
    BinaryMissing { binary: String },
    #[error("{binary} was not permitted to change the rules; init needs root or CAP_NET_ADMIN in the pod's network namespace: {stderr}")]
    PermissionDenied { binary: String, stderr: String },
    #[error("{binary} failed ({status}): {stderr}")]
    CommandFailed {
        binary: String,
        status: String,
        stderr: String,
    },
    #[error("could not run {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: io::Error,
    },
    #[error("could not write to stdout")]
    Output(#[source] io::Error),
}

impl InterceptConfig {
    /// Parses and validates the command line into a rule configuration.
    pub fn from_args(args: &InitArgs) -> Result<Self, InitError> {
        let cfg = InterceptConfig {
            proxy_uid: args.proxy_uid,
            inbound_port: args.inbound_port,
            outbound_port: args.outbound_port,
            admin_port: args.admin_port,
            skip_inbound_ports: parse_ports("--skip-inbound-ports", &args.skip_inbound_ports)?,
            skip_outbound_ports: parse_ports("--skip-outbound-ports", &args.skip_outbound_ports)?,
            skip_outbound_cidrs: parse_cidrs(&args.skip_outbound_cidrs)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The whole `weft-proxy init` command.
pub fn run(args: &InitArgs) -> Result<(), InitError> {
    let cfg = InterceptConfig::from_args(args)?;
    let families: &[IpFamily] = if args.ipv6 {
        &[IpFamily::V4, IpFamily::V6]
    } else {
        &[IpFamily::V4]
    };
    let mut stdout = io::stdout().lock();

    if args.dry_run {
        for (i, family) in families.iter().enumerate() {
            if i > 0 {
                writeln!(stdout).map_err(InitError::Output)?;
            }
            write!(stdout, "{}", render_rules(&cfg, *family)).map_err(InitError::Output)?;
        }
        return stdout.flush().map_err(InitError::Output);
    }

    // From here on stdout is a log: failing to write it (a closed pipe) must not turn
    // installed rules into a failed init.
    let choice = backend::choose(args.iptables_mode)?;
    let _ = writeln!(
        stdout,
        "weft-proxy init: using iptables-{} ({})",
        choice.backend.name(),
        choice.reason
    );
    for family in families {
        if *family == IpFamily::V6 {
            if let Some(reason) = backend::ipv6_unavailable_reason(choice.backend) {
                let _ = writeln!(stdout, "weft-proxy init: skipping IPv6: {reason}");
                continue;
            }
        }
        // The jumps from PREROUTING/OUTPUT live outside weft's chains, so whether to add
        // them depends on what the table holds right now.
        let existing = backend::save_nat(choice.backend, *family)?;
        let input = restore_input(&cfg, *family, &existing);
        backend::restore(choice.backend, *family, &input)?;
        let _ = write!(
            stdout,
            "weft-proxy init: applied with {}:\n{input}",
            choice.backend.restore_binary(*family)
        );
    }
    let _ = stdout.flush();
    Ok(())
}
