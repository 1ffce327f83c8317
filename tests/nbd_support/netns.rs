//! Three "hosts" on one machine for the NBD tests: network namespaces `store`, `a` and `b`
//! joined by a bridge in a fourth, each with its own address, so that what crosses between
//! them really goes over a network interface (veth), not loopback. Built with iproute2
//! (`ip netns`, `ip link`), torn down on drop. Needs root, as the CI runs.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// One of the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// Runs the NBD server.
    Store,
    /// The first VM host.
    A,
    /// The second VM host.
    B,
}

impl Host {
    const ALL: [Host; 3] = [Host::Store, Host::A, Host::B];

    fn short(self) -> &'static str {
        match self {
            Host::Store => "s",
            Host::A => "a",
            Host::B => "b",
        }
    }

    fn number(self) -> u8 {
        match self {
            Host::Store => 1,
            Host::A => 2,
            Host::B => 3,
        }
    }
}

/// The namespaces and their network; removed on drop.
#[derive(Debug)]
pub struct Hosts {
    tag: String,
    subnet: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Hosts {
    /// Builds the hosts; `None` (said loudly) where iproute2 is missing. Failing to build
    /// them otherwise is a test failure: the tests run as root.
    pub fn new(test: &str) -> Option<Hosts> {
        let have_ip = Command::new("ip")
            .arg("-V")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have_ip {
            eprintln!("SKIPPED: {test}: `ip` (iproute2) is not installed");
            return None;
        }
        let pid = std::process::id();
        let h = Hosts {
            tag: format!("vs{}", pid % 100_000),
            subnet: format!("10.213.{}", pid % 250),
        };
        h.build()
            .unwrap_or_else(|e| panic!("{test}: network namespaces: {e}"));
        Some(h)
    }

    fn ns(&self, host: Option<Host>) -> String {
        format!("{}{}", self.tag, host.map_or("sw", Host::short))
    }

    fn build(&self) -> Result<(), String> {
        let sw = self.ns(None);
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for host in Host::ALL {
            let ns = self.ns(Some(host));
            let (inside, outside) = (format!("{ns}i"), format!("{ns}o"));
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &inside, "type", "veth", "peer", "name", &outside,
            ])?;
            ip(&["link", "set", &inside, "netns", &ns])?;
            ip(&["link", "set", &outside, "netns", &sw])?;
            ip(&["-n", &sw, "link", "set", &outside, "master", "br0", "up"])?;
            let addr = format!("{}/24", self.addr(host));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inside])?;
            ip(&["-n", &ns, "link", "set", &inside, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// The host's address.
    pub fn addr(&self, host: Host) -> String {
        format!("{}.{}", self.subnet, host.number())
    }

    /// `cmd` run on `host` (`ip netns exec`), with its arguments and environment.
    pub fn on(&self, host: Host, cmd: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(Some(host))])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// Waits until `host` accepts TCP connections on `port` as seen from `from`.
    pub fn wait_for_port(&self, from: Host, host: Host, port: u16) {
        let probe = format!("exec 3<>/dev/tcp/{}/{port}", self.addr(host));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let mut c = Command::new("bash");
            c.args(["-c", &probe]);
            let ok = self
                .on(from, &c)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}:{port} not reachable",
                self.addr(host)
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// The port the store's NBD server listens on (each test has its own namespaces).
pub const NBD_PORT: u16 = 10809;

/// A process on one of the hosts; killed on drop.
#[derive(Debug)]
pub struct Process(Option<Child>);

impl Process {
    /// Ends it with SIGTERM (qemu-nbd flushes and closes the image) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Hosts {
    /// `qemu-nbd -f raw` serving `file` on the store host to any number of clients (both
    /// VM hosts have it open during a migration's handover); returns the server and the
    /// URI the VM hosts open.
    pub fn serve_nbd(&self, file: &Path) -> (Process, String) {
        let addr = self.addr(Host::Store);
        let mut q = Command::new("qemu-nbd");
        q.args([
            "-f",
            "raw",
            "-t",
            "--shared=8",
            "--cache=writeback",
            "-b",
            &addr,
        ])
        .args(["-p", &NBD_PORT.to_string()])
        .arg(file);
        let child = self
            .on(Host::Store, &q)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        let p = Process(Some(child));
        self.wait_for_port(Host::A, Host::Store, NBD_PORT);
        (p, format!("nbd://{addr}:{NBD_PORT}/"))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends (and their peers) with it.
        for host in Host::ALL {
            let _ = ip(&["netns", "del", &self.ns(Some(host))]);
        }
        let _ = ip(&["netns", "del", &self.ns(None)]);
    }
}
