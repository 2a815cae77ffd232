//! `"network": "egress"` for jailed sandboxes, in a closed world the test builds from network
//! namespaces of its own (nothing can leave the machine, and the host's firewall is never
//! touched): the gateway runs in `gw`, whose only link leads to an "outside" host `out`
//! (192.0.2.0/24), which holds a public address, a cloud-metadata address, a private one and
//! one in a configured deny range, all served by one listener that counts what it accepts.
//! An egress sandbox reaches the public address (seen from outside as the gateway host: NAT)
//! and nothing else: not the metadata, private or denied addresses, not the gateway host's
//! own services (by its loopback, its outside address or its side of the sandbox's link), not
//! another egress sandbox's server. A sandbox without egress reaches nothing. The gateway
//! host's nameserver (on a private address, as on many hosts) answers on port 53 though the
//! rest of its range stays refused.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use serde_json::json;

use crate::common::{
    eventually, fixture_body, wait_sandbox_processes_gone, Client, SpawnedGateway,
};

static WORLDS: AtomicUsize = AtomicUsize::new(0);

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `bind` inside network namespace `ns`, on a throw-away thread (a socket keeps the
/// namespace it was made in, whichever thread then uses it).
fn bind_in<T: Send + 'static>(ns: &str, bind: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("the namespace");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        bind()
    })
    .join()
    .expect("the binding thread")
}

/// A listener on `0.0.0.0:port` inside `ns`, answering each connection with
/// `outside <local> from <peer>` and recording the local address it was reached at.
struct Listener {
    accepted: Arc<Mutex<Vec<Ipv4Addr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    fn start(ns: &str, port: u16) -> Listener {
        let std_listener = bind_in(ns, move || {
            let l = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind in the namespace");
            l.set_nonblocking(true).expect("nonblocking");
            l
        });
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("a tokio listener");
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let seen = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, peer)) = listener.accept().await {
                let local = conn.local_addr().expect("local address");
                if let SocketAddr::V4(v4) = local {
                    seen.lock().unwrap().push(*v4.ip());
                }
                tokio::spawn(async move {
                    // The probe's request, if it comes soon; then the answer and the close.
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), conn.read(&mut [0; 64]))
                            .await;
                    let answer = format!("outside {local} from {}", peer.ip());
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        Listener { accepted, task }
    }

    fn accepted(&self) -> Vec<Ipv4Addr> {
        self.accepted.lock().unwrap().clone()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `gw` ⟷ `out` over one veth pair; deleted (with everything in them) on drop.
struct World {
    gw: String,
    out: String,
}

impl World {
    fn build() -> World {
        let n = WORLDS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("sgt-{}-{n}", std::process::id());
        let (gw, out) = (format!("{tag}-gw"), format!("{tag}-out"));
        for ns in [&gw, &out] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n", &gw, "link", "add", "ext0", "type", "veth", "peer", "name", "ext0", "netns", &out,
        ]);
        ip(&["-n", &gw, "addr", "add", "192.0.2.1/24", "dev", "ext0"]);
        ip(&["-n", &gw, "link", "set", "ext0", "up"]);
        ip(&["-n", &gw, "route", "add", "default", "via", "192.0.2.2"]);
        ip(&["-n", &out, "addr", "add", "192.0.2.2/24", "dev", "ext0"]);
        ip(&["-n", &out, "link", "set", "ext0", "up"]);
        for a in [PUBLIC, METADATA, PRIVATE, DENIED, NAMESERVER] {
            ip(&["-n", &out, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        // What `ip netns exec` shows the gateway as its /etc/resolv.conf.
        let etc = format!("/etc/netns/{gw}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            format!("{etc}/resolv.conf"),
            format!("nameserver {NAMESERVER}\n"),
        )
        .unwrap();
        World { gw, out }
    }

    /// Interfaces in `gw` whose name starts with `prefix`.
    fn gw_links(&self, prefix: &str) -> Vec<String> {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.gw, "-o", "link", "show"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with(prefix))
            .collect()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.gw));
        for ns in [&self.gw, &self.out] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

const PUBLIC: &str = "198.51.100.10";
const METADATA: &str = "169.254.169.254";
const PRIVATE: &str = "10.1.2.3";
const DENIED: &str = "203.0.113.7";
/// The gateway host's nameserver, in a private range egress sandboxes may not reach
/// otherwise.
const NAMESERVER: &str = "10.1.2.53";

/// A UDP server on `ip:53` inside `ns` answering each datagram with `dns <what it got>`,
/// until the returned task is aborted.
fn udp_echo(ns: &str, ip: &str) -> tokio::task::JoinHandle<()> {
    let ip = ip.to_string();
    let std_socket = bind_in(ns, move || {
        let s = std::net::UdpSocket::bind((ip.as_str(), 53)).expect("bind udp 53");
        s.set_nonblocking(true).expect("nonblocking");
        s
    });
    let socket = tokio::net::UdpSocket::from_std(std_socket).expect("a tokio socket");
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let mut answer = b"dns ".to_vec();
            answer.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&answer, peer).await;
        }
    })
}

/// Connects from inside sandbox `id` to `ip:port`: `ok <what it answered>` or
/// `err <the error>`.
async fn probe(gw: &Client, id: &str, ip: &str, port: u16) -> String {
    let script = "import socket, sys\n\
        try:\n    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)\n    \
        s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n    print('ok', s.makefile('rb').read(300).decode())\n\
        except OSError as e:\n    print('err', e.strerror or e)\n";
    let v = gw
        .exec(
            id,
            &json!({"argv": ["python3", "-c", script, ip, port.to_string()]}),
        )
        .await;
    assert_eq!(v["exit_code"], 0, "{v}");
    v["stdout"].as_str().unwrap().trim().to_string()
}

async fn eth0_address(gw: &Client, id: &str) -> String {
    let command = "ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1";
    gw.exec(id, &json!({ "command": command })).await["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_reaches_the_outside_and_nothing_it_must_not() {
    if !crate::common::jail_or_skip() {
        return;
    }
    if !sandgate::backend::process::egress::available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run egress sandboxes (iproute2, nftables)"
        );
        eprintln!("SKIPPED: no programs for egress (ip, nft)");
        return;
    }
    let world = World::build();
    let outside = Listener::start(&world.out, 80);
    let dns = udp_echo(&world.out, NAMESERVER);
    let host_service = Listener::start(&world.gw, 18181);
    let mut gw = SpawnedGateway::start_in_netns(
        8,
        &[
            "--isolation",
            "sandbox",
            "--network",
            "egress",
            "--egress-deny",
            "10.0.0.0/8,203.0.113.0/24",
        ],
        &world.gw,
    )
    .await;
    let a = gw.create(&fixture_body()).await;
    let a = a["id"].as_str().unwrap().to_string();
    let mut b_body = fixture_body();
    b_body["command"] = json!(format!(
        "python3 -m http.server 8081 --bind 0.0.0.0 >/dev/null 2>&1 & {}",
        b_body["command"].as_str().unwrap()
    ));
    let b = gw.create(&b_body).await;
    assert_eq!(b["network"], "egress", "{b}");
    let b = b["id"].as_str().unwrap().to_string();
    let mut c_body = fixture_body();
    c_body["network"] = json!("none");
    let c = gw.create(&c_body).await;
    assert_eq!(c["network"], "none", "{c}");
    let c = c["id"].as_str().unwrap().to_string();
    for id in [&a, &b, &c] {
        gw.wait_ready(id).await;
    }

    // Out, through NAT: the outside host sees the gateway host's address.
    let answer = probe(&gw, &a, PUBLIC, 80).await;
    assert!(
        answer.starts_with(&format!("ok outside {PUBLIC}:80 from 192.0.2.1")),
        "{answer}"
    );
    // Its nameserver (the one in /etc/resolv.conf), on port 53 only.
    let v = gw
        .exec(&a, &json!({"argv": ["python3", "-c",
            "import socket\n\
             ns = [l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n\
             s.sendto(b'query', (ns, 53)); print(ns, s.recv(100).decode())"]}))
        .await;
    assert_eq!(v["stdout"], format!("{NAMESERVER} dns query\n"), "{v}");
    dns.abort();
    // Never: cloud metadata, a private range, a configured deny range, the nameserver's
    // other ports.
    let answer = probe(&gw, &a, NAMESERVER, 80).await;
    assert!(answer.starts_with("err"), "{NAMESERVER}:80: {answer}");
    for target in [METADATA, PRIVATE, DENIED] {
        let answer = probe(&gw, &a, target, 80).await;
        assert!(answer.starts_with("err"), "{target}: {answer}");
    }
    // Never the gateway host itself, by any of its addresses; its own loopback is its own.
    let a_ip = eth0_address(&gw, &a).await;
    let a_host_side = {
        let mut o: Vec<u8> = a_ip.split('.').map(|x| x.parse().unwrap()).collect();
        o[3] -= 1;
        format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])
    };
    for target in ["192.0.2.1", a_host_side.as_str()] {
        let answer = probe(&gw, &a, target, 18181).await;
        assert!(answer.starts_with("err"), "{target}: {answer}");
    }
    let answer = probe(&gw, &a, "127.0.0.1", 18181).await;
    assert_eq!(answer, "err Connection refused", "its own loopback");
    // Never another sandbox, whose server answers at its own address.
    let b_ip = eth0_address(&gw, &b).await;
    let own = eventually(Duration::from_secs(10), "B's server answers B", || {
        let (gw, b, b_ip) = ((*gw).clone(), b.clone(), b_ip.clone());
        async move {
            let a = probe(&gw, &b, &b_ip, 8081).await;
            a.starts_with("ok").then_some(a)
        }
    })
    .await;
    assert!(own.contains("HTTP"), "{own}");
    let answer = probe(&gw, &a, &b_ip, 8081).await;
    assert!(answer.starts_with("err"), "A reached B: {answer}");
    // Without egress, nothing.
    let answer = probe(&gw, &c, PUBLIC, 80).await;
    assert_eq!(answer, "err Network is unreachable", "{answer}");

    assert_eq!(
        outside.accepted(),
        vec![PUBLIC.parse::<Ipv4Addr>().unwrap()],
        "only the public address was reached"
    );
    assert!(
        host_service.accepted().is_empty(),
        "the gateway host was reached: {:?}",
        host_service.accepted()
    );

    // Links die with their sandboxes' namespaces (which pooled proxy connections hold until
    // the pool lets them go: at the latest its sweep); a clean stop removes the table.
    for id in [&a, &b, &c] {
        gw.delete_sandbox(id).await;
        wait_sandbox_processes_gone(id, Duration::from_secs(5)).await;
    }
    assert!(gw.terminate().await.success(), "{}", gw.log());
    eventually(
        Duration::from_secs(5),
        "no sandbox link is left",
        || async { world.gw_links("sg").is_empty().then_some(()) },
    )
    .await;
    let tables = std::process::Command::new("ip")
        .args(["netns", "exec", &world.gw, "nft", "list", "tables"])
        .output()
        .expect("nft");
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(!tables.contains("sandgate"), "{tables}");
}
