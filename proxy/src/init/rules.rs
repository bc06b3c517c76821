//! The interception rule set: validated configuration, and the pure rendering of
//! `iptables-restore` input (including reconciliation against what a table already holds).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::InitError;

/// Chain that PREROUTING sends inbound TCP to; decides whether to redirect.
pub const INBOUND_CHAIN: &str = "WEFT_INBOUND";
/// Chain holding the single inbound REDIRECT rule.
pub const INBOUND_REDIRECT_CHAIN: &str = "WEFT_INBOUND_REDIRECT";
/// Chain that OUTPUT sends locally originated TCP to; decides whether to redirect.
pub const OUTPUT_CHAIN: &str = "WEFT_OUTPUT";
/// Chain holding the single outbound REDIRECT rule.
pub const OUTPUT_REDIRECT_CHAIN: &str = "WEFT_OUTPUT_REDIRECT";

/// Every chain weft owns, in the order it declares them.
pub const WEFT_CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    INBOUND_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    OUTPUT_REDIRECT_CHAIN,
];

/// Prefix of every chain weft owns; jumps into such chains from built-in chains are
/// weft's to manage.
const WEFT_CHAIN_PREFIX: &str = "WEFT_";

/// The built-in nat chains a jump into a WEFT_ chain may hang off.
const BUILTIN_NAT_CHAINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// Which iptables family a rule set is for: `iptables` or `ip6tables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    fn loopback(self) -> Cidr {
        match self {
            IpFamily::V4 => Cidr {
                network: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)),
                prefix_len: 8,
            },
            IpFamily::V6 => Cidr {
                network: IpAddr::V6(Ipv6Addr::LOCALHOST),
                prefix_len: 128,
            },
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// An IP network in CIDR notation, stored with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn family(&self) -> IpFamily {
        match self.network {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

impl FromStr for Cidr {
    type Err = InitError;

    /// Accepts `addr/len` or a bare address (a single host). Host bits are cleared,
    /// as iptables itself would, so `10.1.2.3/8` means `10.0.0.0/8`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| InitError::InvalidCidr {
            value: text.to_string(),
            reason: reason.to_string(),
        };
        let (addr_text, len_text) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| invalid("not an IPv4 or IPv6 address"))?;
        let max_len: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len_text {
            None => max_len,
            Some(len) => {
                // u8's parser accepts a leading '+', which no CIDR notation has.
                if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid("prefix length is not a number"));
                }
                let len: u8 = len
                    .parse()
                    .map_err(|_| invalid("prefix length is out of range"))?;
                if len > max_len {
                    return Err(invalid(if max_len == 32 {
                        "IPv4 prefix length must be 0..=32"
                    } else {
                        "IPv6 prefix length must be 0..=128"
                    }));
                }
                len
            }
        };
        let network = match addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        };
        Ok(Cidr {
            network,
            prefix_len,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// Everything that decides the rule set, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptConfig {
    /// The proxy's UID; its own connections are never redirected.
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    /// Inbound destination ports that bypass the proxy (besides the proxy's own).
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports that bypass the proxy.
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destinations that bypass the proxy; each lands in its own family's rules.
    pub skip_outbound_cidrs: Vec<Cidr>,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        InterceptConfig {
            proxy_uid: 2170,
            inbound_port: 7143,
            outbound_port: 7140,
            admin_port: 7191,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
        }
    }
}

/// Splits a comma separated list, tolerating spaces and empty items (`"22, 80,"`), so
/// values produced by templates are accepted as written.
fn list_items(lists: &[String]) -> impl Iterator<Item = &str> {
    lists
        .iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// Parses a comma separated port list; `flag` names the option in error messages.
pub fn parse_ports(flag: &'static str, lists: &[String]) -> Result<Vec<u16>, InitError> {
    let mut ports = Vec::new();
    for item in list_items(lists) {
        let port = parse_port(flag, item)?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

fn parse_port(flag: &'static str, text: &str) -> Result<u16, InitError> {
    let invalid = || InitError::InvalidPort {
        flag,
        value: text.to_string(),
    };
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid()),
        Ok(port) => Ok(port),
    }
}

/// Parses a comma separated CIDR list (IPv4 and IPv6 may be mixed).
pub fn parse_cidrs(lists: &[String]) -> Result<Vec<Cidr>, InitError> {
    let mut cidrs = Vec::new();
    for item in list_items(lists) {
        let cidr: Cidr = item.parse()?;
        if !cidrs.contains(&cidr) {
            cidrs.push(cidr);
        }
    }
    Ok(cidrs)
}

impl InterceptConfig {
    /// Checks what the individual values cannot: the proxy's own ports must be usable
    /// and distinct, or the redirects would point at the wrong listener.
    pub fn validate(&self) -> Result<(), InitError> {
        let own_ports = [
            ("--inbound-port", self.inbound_port),
            ("--outbound-port", self.outbound_port),
            ("--admin-port", self.admin_port),
        ];
        for (flag, port) in own_ports {
            if port == 0 {
                return Err(InitError::InvalidPort {
                    flag,
                    value: port.to_string(),
                });
            }
        }
        for (i, (flag_a, port_a)) in own_ports.iter().enumerate() {
            for (flag_b, port_b) in &own_ports[i + 1..] {
                if port_a == port_b {
                    return Err(InitError::ConflictingPorts {
                        first: flag_a,
                        second: flag_b,
                        port: *port_a,
                    });
                }
            }
        }
        for port in self
            .skip_inbound_ports
            .iter()
            .chain(&self.skip_outbound_ports)
        {
            if *port == 0 {
                return Err(InitError::InvalidPort {
                    flag: "a skip list",
                    value: "0".to_string(),
                });
            }
        }
        Ok(())
    }
}

/// The jump rules from built-in chains into weft's chains, exactly as `iptables-save`
/// prints them (so existing copies can be recognised textually).
fn jump_rules() -> [String; 2] {
    [
        format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"),
        format!("-A OUTPUT -p tcp -j {OUTPUT_CHAIN}"),
    ]
}

/// The rules inside weft's chains, written in the canonical form `iptables-save` prints
/// them in (match order, explicit `-m tcp`), so a dry run shows what the table will hold.
fn chain_rules(cfg: &InterceptConfig, family: IpFamily) -> Vec<String> {
    let mut rules = Vec::new();

    // Inbound: connections to the proxy's own ports (the kubelet probing the admin port,
    // anything dialing 7143 directly) and to user-listed ports reach their listener as
    // addressed; only the rest is redirected.
    let mut inbound_skips = vec![cfg.inbound_port, cfg.outbound_port, cfg.admin_port];
    for port in &cfg.skip_inbound_ports {
        if !inbound_skips.contains(port) {
            inbound_skips.push(*port);
        }
    }
    for port in inbound_skips {
        rules.push(format!(
            "-A {INBOUND_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    rules.push(format!(
        "-A {INBOUND_CHAIN} -p tcp -j {INBOUND_REDIRECT_CHAIN}"
    ));
    rules.push(format!(
        "-A {INBOUND_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        cfg.inbound_port
    ));

    // Outbound. Order matters; the first match wins.
    //
    // 1. Loopback destinations are the app talking to itself or to the sidecar, and the
    //    inbound proxy handing connections to the app on 127.0.0.1: never intercepted.
    rules.push(format!(
        "-A {OUTPUT_CHAIN} -d {} -j RETURN",
        family.loopback()
    ));
    // 2. Anything else leaving through `lo` is addressed to one of the pod's own
    //    non-loopback addresses (its pod IP): a connection to *this* pod, so it gets the
    //    inbound treatment, exactly as if it had arrived from another pod. Locally
    //    originated packets never traverse PREROUTING, so without this rule the app
    //    calling its own pod IP would be sent to the outbound proxy, which would then dial
    //    itself. This applies to the proxy's UID too: when the outbound proxy resolves a
    //    Service to this very pod, its mTLS connection must reach the inbound proxy.
    //    This does not loop only because the inbound proxy forwards to 127.0.0.1
    //    (rule 1); an inbound proxy dialing the pod IP would be sent back to itself.
    rules.push(format!("-A {OUTPUT_CHAIN} -o lo -j {INBOUND_CHAIN}"));
    // 3. Whatever WEFT_INBOUND let through unredirected (the proxy's ports, skipped
    //    inbound ports) returns here and must not fall through to the outbound redirect.
    rules.push(format!("-A {OUTPUT_CHAIN} -o lo -j RETURN"));
    // 4. The proxy's own upstream connections.
    rules.push(format!(
        "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
        cfg.proxy_uid
    ));
    for port in &cfg.skip_outbound_ports {
        rules.push(format!(
            "-A {OUTPUT_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    for cidr in cfg
        .skip_outbound_cidrs
        .iter()
        .filter(|c| c.family() == family)
    {
        // iptables-save omits a match-everything destination, so render it the same way.
        if cidr.prefix_len() == 0 {
            rules.push(format!("-A {OUTPUT_CHAIN} -j RETURN"));
        } else {
            rules.push(format!("-A {OUTPUT_CHAIN} -d {cidr} -j RETURN"));
        }
    }
    rules.push(format!(
        "-A {OUTPUT_CHAIN} -p tcp -j {OUTPUT_REDIRECT_CHAIN}"
    ));
    rules.push(format!(
        "-A {OUTPUT_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        cfg.outbound_port
    ));
    rules
}

/// The restore input that installs the rule set into a nat table holding none of weft's
/// jumps yet (a fresh pod network namespace). Pure; this is what `--dry-run` prints.
pub fn render_rules(cfg: &InterceptConfig, family: IpFamily) -> String {
    restore_input(cfg, family, "")
}

/// The restore input (for `iptables-restore --noflush`) that brings a nat table whose
/// current `iptables-save -t nat` output is `existing_nat` to exactly the rule set.
///
/// Idempotent by construction: declaring a user chain under `--noflush` flushes it, so
/// weft's chains are rewritten whole; and each jump into a weft chain from a built-in
/// chain is added only if `existing_nat` lacks it, while any other or duplicate jump into
/// a `WEFT_` chain is deleted. Applying the result and then calling this again on the new
/// table state yields input that adds no jumps and deletes nothing.
pub fn restore_input(cfg: &InterceptConfig, family: IpFamily, existing_nat: &str) -> String {
    let wanted_jumps = jump_rules();
    let mut present = [false; 2];
    let mut deletions = Vec::new();
    for line in nat_section_rules(existing_nat) {
        if !is_builtin_jump_into_weft(line) {
            continue;
        }
        match wanted_jumps.iter().position(|jump| jump == line) {
            Some(i) if !present[i] => present[i] = true,
            // A duplicate, or a jump this version no longer installs: remove one copy.
            _ => deletions.push(format!("-D{}", &line[2..])),
        }
    }

    let mut out = String::new();
    out.push_str(&format!(
        "# weft-proxy init: {family} interception, for {} --noflush\n",
        match family {
            IpFamily::V4 => "iptables-restore",
            IpFamily::V6 => "ip6tables-restore",
        }
    ));
    out.push_str("*nat\n");
    for chain in WEFT_CHAINS {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for line in deletions {
        out.push_str(&line);
        out.push('\n');
    }
    for rule in chain_rules(cfg, family) {
        out.push_str(&rule);
        out.push('\n');
    }
    for (jump, already) in wanted_jumps.iter().zip(present) {
        if !already {
            out.push_str(jump);
            out.push('\n');
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// The `-A` lines of the `*nat` section of `iptables-save` output, whitespace-trimmed.
fn nat_section_rules(save_output: &str) -> impl Iterator<Item = &str> {
    let mut in_nat = false;
    save_output.lines().filter_map(move |raw| {
        let line = raw.trim();
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
            return None;
        }
        if line == "COMMIT" {
            in_nat = false;
            return None;
        }
        (in_nat && line.starts_with("-A ")).then_some(line)
    })
}

/// Whether a saved rule line appends to a built-in chain and jumps (or goes) to a chain
/// named `WEFT_*`.
fn is_builtin_jump_into_weft(line: &str) -> bool {
    let mut tokens = line.split_whitespace();
    let (Some("-A"), Some(chain)) = (tokens.next(), tokens.next()) else {
        return false;
    };
    if !BUILTIN_NAT_CHAINS.contains(&chain) {
        return false;
    }
    let mut previous = "";
    for token in tokens {
        if (previous == "-j" || previous == "-g") && token.starts_with(WEFT_CHAIN_PREFIX) {
            return true;
        }
        previous = token;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        match text.parse() {
            Ok(c) => c,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    #[test]
    fn cidr_parsing_normalises_and_rejects() {
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("10.1.2.3").to_string(), "10.1.2.3/32");
        assert_eq!(cidr("2001:db8:0:0::1/64").to_string(), "2001:db8::/64");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("::/0").to_string(), "::/0");
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "example.com/8",
            "fe80::1%eth0/64",
        ] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(InitError::InvalidCidr { .. })),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn port_lists_accept_spaces_and_reject_garbage() {
        let list = |s: &str| vec![s.to_string()];
        assert_eq!(
            parse_ports("--x", &list(" 22 , 80,,443, 22")).ok(),
            Some(vec![22, 80, 443])
        );
        assert_eq!(parse_ports("--x", &list("")).ok(), Some(vec![]));
        for bad in ["0", "65536", "-1", "+80", "8o", "80-90", "1 2"] {
            assert!(
                matches!(
                    parse_ports("--x", &list(bad)),
                    Err(InitError::InvalidPort { flag: "--x", .. })
                ),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn conflicting_own_ports_are_rejected() {
        let cfg = InterceptConfig {
            admin_port: 7143,
            ..InterceptConfig::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(InitError::ConflictingPorts { port: 7143, .. })
        ));
        assert!(InterceptConfig::default().validate().is_ok());
    }

    #[test]
    fn cidrs_only_land_in_their_family() {
        let cfg = InterceptConfig {
            skip_outbound_cidrs: vec![cidr("10.0.0.0/8"), cidr("fd00::/8")],
            ..InterceptConfig::default()
        };
        let v4 = render_rules(&cfg, IpFamily::V4);
        let v6 = render_rules(&cfg, IpFamily::V6);
        assert!(v4.contains("-d 10.0.0.0/8 -j RETURN") && !v4.contains("fd00::/8"));
        assert!(v6.contains("-d fd00::/8 -j RETURN") && !v6.contains("10.0.0.0/8"));
        assert!(v6.contains("-d ::1/128 -j RETURN"));
    }

    #[test]
    fn reconcile_adds_missing_jumps_and_removes_extras() {
        let cfg = InterceptConfig::default();
        let fresh = render_rules(&cfg, IpFamily::V4);
        assert!(fresh.contains("-A PREROUTING -p tcp -j WEFT_INBOUND\n"));
        assert!(fresh.contains("-A OUTPUT -p tcp -j WEFT_OUTPUT\n"));

        // A table where init already ran once: no jump is added again.
        let saved = "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n\
            -A INPUT -p tcp -j WEFT_INBOUND\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n\
            -A PREROUTING -p tcp -j WEFT_INBOUND\n-A OUTPUT -p tcp -j WEFT_OUTPUT\n\
            -A OUTPUT -j KUBE-SOMETHING\n-A WEFT_OUTPUT -p tcp -j WEFT_OUTPUT_REDIRECT\nCOMMIT\n";
        let again = restore_input(&cfg, IpFamily::V4, saved);
        assert!(!again.contains("-A PREROUTING"));
        assert!(!again.contains("-A OUTPUT "));
        assert!(!again.contains("-D "), "nothing to delete:\n{again}");

        // Duplicates and stale jumps (other matches, other WEFT_ chains) are removed.
        let messy = "*nat\n-A PREROUTING -p tcp -j WEFT_INBOUND\n\
            -A PREROUTING -p tcp -j WEFT_INBOUND\n-A OUTPUT -p udp -j WEFT_OUTPUT\n\
            -A POSTROUTING -g WEFT_OLD\nCOMMIT\n";
        let fixed = restore_input(&cfg, IpFamily::V4, messy);
        let deletions: Vec<&str> = fixed.lines().filter(|l| l.starts_with("-D ")).collect();
        assert_eq!(
            deletions,
            [
                "-D PREROUTING -p tcp -j WEFT_INBOUND",
                "-D OUTPUT -p udp -j WEFT_OUTPUT",
                "-D POSTROUTING -g WEFT_OLD",
            ]
        );
        assert!(!fixed.contains("-A PREROUTING"));
        assert!(fixed.contains("-A OUTPUT -p tcp -j WEFT_OUTPUT\n"));
    }
}
