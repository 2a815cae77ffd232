//! `"network": "egress"` for jailed sandboxes: a veth pair between the gateway host and the
//! sandbox's own network namespace (a /30 of `egress_subnet` each: host side `.1`, sandbox
//! `.2`, its default route), NAT on the way out, and one nftables table that refuses what a
//! sandbox must never reach: the gateway host's own addresses (any of them, loopback
//! included), other sandboxes, link-local (cloud metadata), multicast, IPv6, and the
//! configured `egress_deny` ranges.
//!
//! DNS: the host's own nameservers (from its `resolv.conf`, which sandboxes read through the
//! read-only `/etc`) stay reachable on port 53 whatever the deny ranges say: they are often
//! on a private address (a LAN router, a cloud resolver), and without them `npm install`
//! cannot resolve a name. A host that resolves through a loopback stub (systemd-resolved)
//! gives sandboxes its upstream list instead ([`resolver_bind`]).
//!
//! The namespace is the one bubblewrap made (`--unshare-net`), held by the sandbox's PID 1:
//! it dies with the sandbox, and the host side of its link with it, so a crash leaves no
//! namespace or link behind. The table matches interfaces by this gateway's prefix and ranges
//! only: nothing is added or removed per sandbox, and rebuilding it is one atomic `nft -f`.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::config::Cidr;

/// Ranges no sandbox reaches whatever the configuration says.
const ALWAYS_DENIED: [&str; 4] = ["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3"];

/// Whether egress can be given here: the `ip` and `nft` programs.
pub fn available() -> bool {
    crate::runtimes::program_installed("ip") && crate::runtimes::program_installed("nft")
}

/// One sandbox's link.
#[derive(Debug, PartialEq, Eq)]
pub struct Link {
    /// The host side's interface name.
    pub host_if: String,
    pub host: Ipv4Addr,
    pub sandbox: Ipv4Addr,
}

pub struct Egress {
    /// Interface prefix (`sg` and four characters of the gateway id), also naming the table.
    prefix: String,
    net: Ipv4Addr,
    len: u8,
    deny: Vec<String>,
    /// The host's nameservers, reachable on port 53.
    dns: Vec<Ipv4Addr>,
    /// Whether the table is in place.
    installed: Mutex<bool>,
}

impl Egress {
    pub fn new(gateway_id: &str, subnet: &Cidr, deny: &[Cidr]) -> Egress {
        let token: String = gateway_id
            .trim_start_matches("gw-")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(4)
            .collect();
        let (net, len) = subnet.ipv4().unwrap_or((Ipv4Addr::new(10, 201, 0, 0), 16));
        Egress {
            prefix: format!("sg{token}"),
            net,
            len,
            deny: deny
                .iter()
                .filter(|c| c.ipv4().is_some())
                .map(ToString::to_string)
                .collect(),
            dns: host_nameservers(),
            installed: Mutex::new(false),
        }
    }

    /// The same, with the nameservers given (tests).
    pub fn with_nameservers(mut self, dns: Vec<Ipv4Addr>) -> Egress {
        self.dns = dns;
        self
    }

    /// The link of slot `slot` (a sandbox's uid offset), if the subnet has room for it.
    pub fn link(&self, slot: u32) -> Option<Link> {
        let slots = 1u64 << (30 - u32::from(self.len));
        if u64::from(slot) >= slots.min(1 << 16) {
            return None;
        }
        let base = u32::from(self.net) + slot * 4;
        Some(Link {
            host_if: format!("{}{slot:x}", self.prefix),
            host: Ipv4Addr::from(base + 1),
            sandbox: Ipv4Addr::from(base + 2),
        })
    }

    fn table(&self) -> String {
        format!("sandgate_{}", &self.prefix[2..])
    }

    /// The nftables script that (re)builds the table in one transaction.
    pub fn ruleset(&self) -> String {
        let (table, p) = (self.table(), &self.prefix);
        let subnet = format!("{}/{}", self.net, self.len);
        let deny: Vec<&str> = ALWAYS_DENIED
            .iter()
            .copied()
            .chain([subnet.as_str()])
            .chain(self.deny.iter().map(String::as_str))
            .collect();
        let deny = deny.join(", ");
        let (dns_set, dns_rules) = if self.dns.is_empty() {
            (String::new(), String::new())
        } else {
            let list: Vec<String> = self.dns.iter().map(ToString::to_string).collect();
            (
                format!(
                    "\tset dns4 {{ type ipv4_addr; elements = {{ {} }} }}\n",
                    list.join(", ")
                ),
                format!(
                    "\t\tiifname \"{p}*\" ip daddr @dns4 udp dport 53 accept\n\
                     \t\tiifname \"{p}*\" ip daddr @dns4 tcp dport 53 accept\n"
                ),
            )
        };
        format!(
            "table inet {table}\n\
             delete table inet {table}\n\
             table inet {table} {{\n\
             \tset deny4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {deny} }} }}\n\
             {dns_set}\
             \tchain spoofing {{ type filter hook prerouting priority -150; policy accept;\n\
             \t\tiifname \"{p}*\" fib saddr . iif oif missing drop\n\
             \t}}\n\
             \tchain to_host {{ type filter hook input priority -10; policy accept;\n\
             {dns_rules}\
             \t\tiifname \"{p}*\" reject with icmpx admin-prohibited\n\
             \t}}\n\
             \tchain through {{ type filter hook forward priority -10; policy accept;\n\
             \t\tiifname \"{p}*\" meta nfproto ipv6 reject with icmpx admin-prohibited\n\
             \t\tiifname \"{p}*\" oifname \"{p}*\" reject with icmpx admin-prohibited\n\
             {dns_rules}\
             \t\tiifname \"{p}*\" ip daddr @deny4 reject with icmpx admin-prohibited\n\
             \t\tiifname \"{p}*\" accept\n\
             \t\toifname \"{p}*\" ct state established,related accept\n\
             \t\toifname \"{p}*\" drop\n\
             \t}}\n\
             \tchain nat_out {{ type nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {subnet} oifname != \"{p}*\" masquerade\n\
             \t}}\n\
             }}\n"
        )
    }

    /// Puts the table in place and turns IPv4 forwarding on (once per gateway).
    fn ensure_firewall(&self) -> Result<(), String> {
        let mut installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        if *installed {
            return Ok(());
        }
        run("nft", &["-f", "-"], Some(&self.ruleset()))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| format!("turning IPv4 forwarding on: {e}"))?;
        self.open_docker_forwarding();
        tracing::info!(
            table = %self.table(),
            "egress: nftables table in place, IPv4 forwarding on"
        );
        *installed = true;
        Ok(())
    }

    /// Docker sets the `FORWARD` policy of iptables' filter table to drop, and an accept in
    /// another table cannot override a drop: where its `DOCKER-USER` chain exists, the
    /// sandboxes' forwarding is accepted there (each rule once).
    fn open_docker_forwarding(&self) {
        if !crate::runtimes::program_installed("iptables")
            || run("iptables", &["-n", "-L", "DOCKER-USER"], None).is_err()
        {
            return;
        }
        let inbound = format!("{}+", self.prefix);
        let rules: [Vec<&str>; 2] = [
            vec!["-i", &inbound, "-j", "ACCEPT"],
            vec![
                "-o",
                &inbound,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ],
        ];
        for rule in rules {
            let check: Vec<&str> = ["-C", "DOCKER-USER"]
                .iter()
                .copied()
                .chain(rule.iter().copied())
                .collect();
            if run("iptables", &check, None).is_err() {
                let insert: Vec<&str> = ["-I", "DOCKER-USER"]
                    .iter()
                    .copied()
                    .chain(rule.iter().copied())
                    .collect();
                if let Err(e) = run("iptables", &insert, None) {
                    tracing::warn!(error = %e, "egress: cannot open Docker's FORWARD chain");
                }
            }
        }
    }

    /// Links the network namespace of the sandbox whose PID 1 is `init` to the host, as
    /// slot `slot`.
    pub fn attach(&self, init: i32, slot: u32) -> Result<(), String> {
        let link = self
            .link(slot)
            .ok_or_else(|| format!("egress_subnet has no room for sandbox slot {slot}"))?;
        self.ensure_firewall()?;
        let Link {
            host_if,
            host,
            sandbox,
        } = &link;
        // A link of this slot's previous life may not be gone yet.
        let _ = run("ip", &["link", "del", host_if], None);
        run(
            "ip",
            &["-batch", "-"],
            Some(&format!(
                "link add {host_if} type veth peer name eth0 netns {init}\n\
                 addr add {host}/30 dev {host_if}\n\
                 link set {host_if} up\n"
            )),
        )?;
        run(
            "nsenter",
            &[
                &format!("--net=/proc/{init}/ns/net"),
                "--",
                "ip",
                "-batch",
                "-",
            ],
            Some(&format!(
                "addr add {sandbox}/30 dev eth0\n\
                 link set eth0 up\n\
                 route add default via {host}\n"
            )),
        )
    }

    /// Removes the table (at a clean shutdown, every sandbox stopped).
    pub fn remove_firewall(&self) {
        let mut installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        if *installed {
            let _ = run("nft", &["delete", "table", "inet", &self.table()], None);
            *installed = false;
        }
    }
}

/// The IPv4 nameservers in a `resolv.conf`.
fn nameservers(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next()?.parse::<Ipv4Addr>().ok())
                .flatten()
        })
        .collect()
}

/// A resolver's upstream list that systemd-resolved keeps beside its loopback stub.
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";

/// The host's own nameservers, and whether they are only a loopback stub (systemd-resolved's
/// `127.0.0.53`), which a sandbox cannot reach.
fn host_resolver() -> (Vec<Ipv4Addr>, bool) {
    let own = nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
    let stub = !own.is_empty() && own.iter().all(Ipv4Addr::is_loopback);
    (own, stub)
}

/// The upstream nameservers systemd-resolved lists beside its stub.
fn resolved_upstreams() -> Vec<Ipv4Addr> {
    nameservers(&std::fs::read_to_string(RESOLVED_UPSTREAMS).unwrap_or_default())
}

/// The nameservers sandboxes use: the host's, or, behind a loopback stub, its upstreams.
fn host_nameservers() -> Vec<Ipv4Addr> {
    match host_resolver() {
        (_, true) => resolved_upstreams(),
        (own, false) => own.into_iter().filter(|a| !a.is_loopback()).collect(),
    }
}

/// Where the host resolves through a loopback stub (systemd-resolved: `/etc/resolv.conf`
/// names `127.0.0.53`, which a sandbox cannot reach), the file with the upstream
/// nameservers and the path a sandbox reads as its `resolv.conf` (the stub file's path,
/// under the sandbox's own `/run`), for the jail to bind read-only.
pub fn resolver_bind() -> Option<(PathBuf, PathBuf)> {
    if !host_resolver().1 || resolved_upstreams().is_empty() {
        return None;
    }
    let upstreams = PathBuf::from(RESOLVED_UPSTREAMS);
    let target = std::fs::canonicalize("/etc/resolv.conf").ok()?;
    // Only a target on a path the sandbox gets fresh (its own /run) can be bound.
    target.starts_with("/run").then_some((upstreams, target))
}

/// Runs `program` with `args` (and `stdin`), an error naming its stderr if it fails.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    // Registered with the gateway's reaper, which would otherwise take its exit status.
    let gate = super::reaper::spawning();
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let pid = child.id() as i32;
    super::reaper::own(pid);
    drop(gate);
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("{program}: {e}"))?;
    }
    let out = child.wait_with_output();
    super::reaper::disown(pid);
    let out = out.map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(subnet: &str) -> Egress {
        Egress::new(
            "gw-abcdefgh",
            &subnet.parse().unwrap(),
            &[
                "203.0.113.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
        )
    }

    #[test]
    fn nameservers_are_read_from_resolv_conf_and_let_through() {
        let text = "# comment\nnameserver 10.255.255.53\nnameserver ::1\nsearch x\n\
                    nameserver 127.0.0.53\n";
        assert_eq!(
            nameservers(text),
            [
                "10.255.255.53".parse::<Ipv4Addr>().unwrap(),
                "127.0.0.53".parse().unwrap()
            ]
        );
        let r = egress("10.201.0.0/16")
            .with_nameservers(vec!["10.255.255.53".parse().unwrap()])
            .ruleset();
        assert!(
            r.contains("set dns4 { type ipv4_addr; elements = { 10.255.255.53 } }"),
            "{r}"
        );
        // Before the rejections in both chains.
        let dns = r.find("ip daddr @dns4 udp dport 53 accept").unwrap();
        assert!(dns < r.find("iifname \"sgabcd*\" reject").unwrap(), "{r}");
        let second = r.rfind("ip daddr @dns4 tcp dport 53 accept").unwrap();
        assert!(second < r.find("@deny4 reject").unwrap(), "{r}");
        let none = egress("10.201.0.0/16").with_nameservers(vec![]).ruleset();
        assert!(!none.contains("dns4"), "{none}");
    }

    #[test]
    fn each_slot_gets_its_own_slash_30() {
        let e = egress("10.201.0.0/16");
        assert_eq!(
            e.link(0),
            Some(Link {
                host_if: "sgabcd0".into(),
                host: "10.201.0.1".parse().unwrap(),
                sandbox: "10.201.0.2".parse().unwrap(),
            })
        );
        let l = e.link(0x3fff).unwrap();
        assert_eq!(l.host_if, "sgabcd3fff");
        assert_eq!(l.sandbox, "10.201.255.254".parse::<Ipv4Addr>().unwrap());
        assert_eq!(e.link(0x4000), None, "past the /16");
        assert!(l.host_if.len() <= 15, "an interface name fits IFNAMSIZ");
        assert_eq!(egress("10.9.0.0/29").link(2), None);
    }

    #[test]
    fn the_ruleset_refuses_what_must_not_be_reached() {
        let r = egress("10.201.0.0/16").ruleset();
        assert!(r.starts_with("table inet sandgate_abcd\ndelete table inet sandgate_abcd\n"));
        for needed in [
            "169.254.0.0/16",
            "127.0.0.0/8",
            "10.201.0.0/16, 203.0.113.0/24 }",
            "iifname \"sgabcd*\" reject with icmpx admin-prohibited",
            "iifname \"sgabcd*\" oifname \"sgabcd*\" reject",
            "ip saddr 10.201.0.0/16 oifname != \"sgabcd*\" masquerade",
        ] {
            assert!(r.contains(needed), "{needed} missing from\n{r}");
        }
        assert!(!r.contains("2001:db8"), "IPv6 is refused as a whole");
    }
}
