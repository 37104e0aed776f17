//! What a node changes on the host, captured before it starts and put back when it stops.
//!
//! The kubelet and containerd change the host even with private directories: sysctls, iptables
//! chains, cgroups under `/kubepods`, mounts under the kubelet's root (its own rshared bind
//! mount, volumes), directories such as `/var/lib/kubelet/device-plugins`, `/var/log/containers`
//! and `/var/lib/cni`, and the harness adds the pod network's bridge. [`HostState`] is all of
//! that; `restore` puts it back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::config::BRIDGE;

/// The sysctls the kubelet sets (`vm.overcommit_memory`, `kernel.panic`, …) and IP forwarding,
/// which must stay as it was (off on a test machine).
const SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
];

/// Host directories the kubelet, containerd, its shims and the CNI plugins write into whatever
/// their configuration says (found by comparing the whole file system before and after).
const WATCHED: &[&str] = &[
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/run/containerd",
    "/run/netns",
    "/opt/containerd",
    "/etc/cni",
    "/etc/kubernetes",
    "/run/mount",
];

/// The parts of the host a node changes. Equal before and after a node means it left no trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    /// `/proc/sys` path → value, for the sysctls the kubelet sets and IP forwarding.
    pub sysctls: BTreeMap<String, String>,
    /// Mount points with their file system, source and propagation → how many are stacked.
    pub mounts: BTreeMap<String, usize>,
    /// `<hierarchy>:<path>` of every top-level cgroup and everything under `kubepods*`.
    pub cgroups: BTreeSet<String>,
    /// `iptables-save` / `ip6tables-save` → their rules, without counters and comments.
    pub iptables: BTreeMap<String, String>,
    /// Network interface names.
    pub links: BTreeSet<String>,
    /// Addresses on the loopback interface (the node adds the pods' service address there).
    #[serde(default)]
    pub loopback_addresses: BTreeSet<String>,
    /// Every file and directory under the watched host directories.
    pub paths: BTreeSet<String>,
}

impl HostState {
    /// Reads the current state of the host.
    pub fn capture() -> Self {
        Self {
            sysctls: SYSCTLS
                .iter()
                .filter_map(|s| {
                    let value = std::fs::read_to_string(Path::new("/proc/sys").join(s)).ok()?;
                    Some((s.to_string(), value.trim().to_string()))
                })
                .collect(),
            mounts: mounts().into_iter().fold(BTreeMap::new(), |mut all, m| {
                *all.entry(m.describe()).or_insert(0) += 1;
                all
            }),
            cgroups: cgroups(),
            iptables: ["iptables-save", "ip6tables-save"]
                .iter()
                .filter_map(|cmd| Some((cmd.to_string(), iptables_rules(cmd)?)))
                .collect(),
            links: read_dir_names(Path::new("/sys/class/net")),
            loopback_addresses: loopback_addresses(),
            paths: WATCHED
                .iter()
                .flat_map(|root| walk(Path::new(root)))
                .collect(),
        }
    }

    /// What differs from `before`, one readable line each; empty when nothing does.
    pub fn differences(&self, before: &HostState) -> Vec<String> {
        let mut out = Vec::new();
        for (key, value) in &before.sysctls {
            let now = self.sysctls.get(key).map_or("(absent)", String::as_str);
            if now != value {
                out.push(format!("sysctl {key}: {value} before, {now} now"));
            }
        }
        let points: BTreeSet<&String> = before.mounts.keys().chain(self.mounts.keys()).collect();
        for point in points {
            let (was, is) = (before.mounts.get(point), self.mounts.get(point));
            if was != is {
                let n = |c: Option<&usize>| c.copied().unwrap_or(0);
                out.push(format!("mount {point}: {} before, {} now", n(was), n(is)));
            }
        }
        set_diff(&mut out, "cgroup", &before.cgroups, &self.cgroups);
        set_diff(&mut out, "network interface", &before.links, &self.links);
        set_diff(
            &mut out,
            "loopback address",
            &before.loopback_addresses,
            &self.loopback_addresses,
        );
        set_diff(&mut out, "path", &before.paths, &self.paths);
        for (cmd, rules) in &before.iptables {
            if self.iptables.get(cmd) != Some(rules) {
                out.push(format!(
                    "{cmd}: before:\n{rules}\nnow:\n{}",
                    self.iptables.get(cmd).map_or("(absent)", String::as_str)
                ));
            }
        }
        out
    }
}

fn set_diff(out: &mut Vec<String>, what: &str, before: &BTreeSet<String>, now: &BTreeSet<String>) {
    out.extend(now.difference(before).map(|x| format!("{what} added: {x}")));
    out.extend(
        before
            .difference(now)
            .map(|x| format!("{what} removed: {x}")),
    );
}

/// One line of `/proc/self/mountinfo`.
struct Mount {
    point: String,
    fstype: String,
    fields: String,
}

impl Mount {
    /// Mount point, file system, source and propagation (not the ids, which are not stable).
    fn describe(&self) -> String {
        format!("{} {}", self.point, self.fields)
    }
}

/// The mount table, in mount order.
fn mounts() -> Vec<Mount> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    table
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let f: Vec<&str> = before.split(' ').collect();
            let point = f.get(4)?.replace("\\040", " ");
            let propagation = f.get(6..).unwrap_or_default().join(",");
            Some(Mount {
                point,
                fstype: after.split(' ').next()?.to_string(),
                fields: format!("[{}] root={} {} {after}", propagation, f.get(3)?, f.get(5)?),
            })
        })
        .collect()
}

/// The cgroup hierarchies' mount points (v1 controllers and the v2 unified one).
fn cgroup_roots() -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .map(|m| PathBuf::from(m.point))
        .collect()
}

fn cgroups() -> BTreeSet<String> {
    cgroup_dirs().into_iter().map(|(key, _)| key).collect()
}

/// `<hierarchy>:<path>` and the directory of every top-level cgroup and of everything under
/// `kubepods*` (the kubelet's), in every hierarchy.
fn cgroup_dirs() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for root in cgroup_roots() {
        for top in read_dir_names(&root) {
            let dir = root.join(&top);
            let mut dirs = vec![dir.clone()];
            if top.starts_with("kubepods") {
                dirs.extend(walk(&dir).into_iter().map(PathBuf::from));
            }
            for d in dirs.into_iter().filter(|d| d.is_dir()) {
                let rel = d.strip_prefix(&root).unwrap_or(&d).display().to_string();
                out.push((format!("{}:/{rel}", root.display()), d));
            }
        }
    }
    out
}

/// The kubelet's cgroups (under `kubepods*`) with their keys, deepest first.
fn kubepods_cgroups() -> Vec<(String, PathBuf)> {
    let mut dirs: Vec<(String, PathBuf)> = cgroup_dirs()
        .into_iter()
        .filter(|(_, d)| {
            d.components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with("kubepods"))
        })
        .collect();
    dirs.sort_by_key(|(_, d)| std::cmp::Reverse(d.components().count()));
    dirs
}

fn iptables_rules(cmd: &str) -> Option<String> {
    let out = Command::new(cmd).stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            // Chain lines carry packet counters ("[12:3456]"), which traffic changes.
            .map(|l| l.split(" [").next().unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

fn read_dir_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every path under `root` (not following symlinks), `root` included if it exists.
fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return out;
    };
    out.push(root.display().to_string());
    if meta.is_dir() {
        for name in read_dir_names(root) {
            out.extend(walk(&root.join(name)));
        }
    }
    out
}

/// What `restore` needs: the state before, and what the node owns.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Saved {
    pub before: HostState,
    /// The node's private directory: every mount under it and every process naming it is the node's.
    pub dir: PathBuf,
}

/// Puts the host back as `saved.before` says; returns the host's state afterwards.
pub(crate) fn restore(saved: &Saved) -> HostState {
    let before = &saved.before;
    kill_node_processes(&saved.dir);
    unmount_new(before, &saved.dir);
    let now = HostState::capture();
    // A pod's host-side veth outlives its killed sandbox until the kernel tears the network
    // namespace down, which it does in the background: delete it now so the host is restored
    // when this returns. It may vanish on its own meanwhile, so a failure here is not one.
    for link in now.links.difference(&before.links) {
        if link.starts_with("veth") {
            let _ = Command::new("ip").args(["link", "delete", link]).output();
        }
    }
    if now.links.contains(BRIDGE) && !before.links.contains(BRIDGE) {
        run("ip", &["link", "delete", BRIDGE]);
    }
    for address in now
        .loopback_addresses
        .difference(&before.loopback_addresses)
    {
        run("ip", &["addr", "del", address, "dev", "lo"]);
    }
    for (key, dir) in kubepods_cgroups() {
        if !before.cgroups.contains(&key) {
            let _ = std::fs::remove_dir(&dir);
        }
    }
    for (key, value) in &before.sysctls {
        if now.sysctls.get(key) != Some(value) {
            let _ = std::fs::write(Path::new("/proc/sys").join(key), value);
        }
    }
    for (cmd, rules) in &before.iptables {
        if now.iptables.get(cmd) != Some(rules) {
            restore_iptables(cmd, rules, now.iptables.get(cmd));
        }
    }
    remove_new_paths(&before.paths, &now.paths);
    let mounted = mounts();
    if !mounted
        .iter()
        .any(|m| Path::new(&m.point).starts_with(&saved.dir))
    {
        let _ = std::fs::remove_dir_all(&saved.dir);
    }
    HostState::capture()
}

/// Removes what appeared under the watched host directories (top-most first: removing a
/// directory removes what it holds).
fn remove_new_paths(before: &BTreeSet<String>, now: &BTreeSet<String>) {
    let new: BTreeSet<&String> = now.difference(before).collect();
    for path in &new {
        let p = Path::new(path.as_str());
        if p.parent()
            .is_some_and(|d| new.contains(&d.display().to_string()))
        {
            continue;
        }
        let _ = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
    }
}

/// Kills every process of the node: the pods (every process in a `kubepods` cgroup, which
/// outlive the kubelet) and whatever names the node's directory (containerd's shims, which
/// outlive containerd, and any component a killed test left behind).
fn kill_node_processes(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let me = std::process::id().to_string();
    loop {
        let mut pids: BTreeSet<String> = kubepods_cgroups()
            .iter()
            .filter_map(|(_, d)| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|procs| procs.lines().map(str::to_string).collect::<Vec<_>>())
            .collect();
        let needle = dir.display().to_string();
        for pid in read_dir_names(Path::new("/proc")) {
            if pid.parse::<u32>().is_err() || pid == me {
                continue;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                pids.insert(pid);
            }
        }
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        let args: Vec<&str> = std::iter::once("-KILL")
            .chain(pids.iter().map(String::as_str))
            .collect();
        let _ = Command::new("kill")
            .args(&args)
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Unmounts (lazily, newest first) every mount under the node's directory, and every new one
/// under the watched host directories.
fn unmount_new(before: &HostState, dir: &Path) {
    for mount in mounts().iter().rev() {
        let point = Path::new(&mount.point);
        let ours = point.starts_with(dir)
            || (WATCHED.iter().any(|w| point.starts_with(w))
                && !before.mounts.contains_key(&mount.describe()));
        if ours {
            let _ = Command::new("umount")
                .arg("--lazy")
                .arg(point)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Restores the tables `rules` lists, and empties (so removes) the ones it does not.
fn restore_iptables(save_cmd: &str, rules: &str, now: Option<&String>) {
    let restore_cmd = save_cmd.replace("-save", "-restore");
    let tables_before: BTreeSet<&str> = rules.lines().filter_map(|l| l.strip_prefix('*')).collect();
    let mut input = format!("{rules}\n");
    for table in now
        .into_iter()
        .flat_map(|r| r.lines().filter_map(|l| l.strip_prefix('*')))
    {
        if !tables_before.contains(table) {
            input.push_str(&format!("*{table}\nCOMMIT\n"));
        }
    }
    let mut child = match Command::new(&restore_cmd).stdin(Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("node: cannot run {restore_cmd}: {e}");
            return;
        }
    };
    use std::io::Write as _;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let _ = child.wait();
}

/// Runs a command, printing (not failing on) its error: restoring goes on with the rest.
pub(crate) fn run(program: &str, args: &[&str]) -> bool {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "node: {program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("node: cannot run {program}: {e}");
            false
        }
    }
}

/// `10.96.0.1/32`-style addresses of `lo` (IPv4 and IPv6), from `ip -o addr show dev lo`.
fn loopback_addresses() -> BTreeSet<String> {
    let out = Command::new("ip")
        .args(["-o", "addr", "show", "dev", "lo"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next().map(str::to_string)
        })
        .collect()
}
