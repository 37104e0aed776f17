//! Measuring helpers of the operator benchmark: Prometheus scrapes, process CPU and memory,
//! OpenBao's audit log over a window, and a watch that times when every BaoSecret is Ready.

pub mod leases;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;

/// One Prometheus text scrape.
pub struct Scrape(String);

impl Scrape {
    /// Scrapes `url` (empty when unreachable: every sum is then 0).
    pub async fn http(url: &str) -> Self {
        let text = match reqwest::get(url).await {
            Ok(resp) => resp.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        Self(text)
    }

    /// Scrapes the API server's own `/metrics`.
    pub async fn apiserver(client: &kube::Client) -> Self {
        let req = http::Request::get("/metrics")
            .body(Vec::new())
            .expect("metrics request");
        Self(client.request_text(req).await.unwrap_or_default())
    }

    /// Series of `name`: their labels and values.
    fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (Vec<(&'a str, &'a str)>, f64)> {
        self.0.lines().filter_map(move |line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.rsplit_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let labels = labels
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k, v.trim_end_matches('"')))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
    }

    /// Sum of the series of `name` that have every label in `having`.
    pub fn sum(&self, name: &str, having: &[(&str, &str)]) -> f64 {
        self.series(name)
            .filter(|(labels, _)| having.iter().all(|h| labels.contains(h)))
            .map(|(_, v)| v)
            .sum()
    }

    /// Sums of the series of `name`, grouped by the values of the labels `keys`.
    pub fn by(&self, name: &str, keys: &[&str]) -> BTreeMap<Vec<String>, f64> {
        let mut out = BTreeMap::new();
        for (labels, v) in self.series(name) {
            let group = keys
                .iter()
                .map(|k| {
                    labels
                        .iter()
                        .find(|(l, _)| l == k)
                        .map_or(String::new(), |(_, v)| v.to_string())
                })
                .collect();
            *out.entry(group).or_insert(0.0) += v;
        }
        out
    }
}

/// `after - before` per group, non-zero ones only.
pub fn delta(
    before: &BTreeMap<Vec<String>, f64>,
    after: &BTreeMap<Vec<String>, f64>,
) -> BTreeMap<Vec<String>, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d != 0.0)
        .collect()
}

/// A process's memory, in KiB: resident now and at its peak.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// VmRSS.
    pub rss: u64,
    /// VmHWM (peak resident).
    pub peak: u64,
}

/// Reads `pid`'s memory (zeros when it is gone).
pub fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
    }
}

/// MiB from KiB, for printing.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// CPU seconds (user + system) `pid` has used so far (0 when it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // USER_HZ is 100 on every Linux ABI.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The test bed's processes (`<name>.pid` files its components write) plus the operator and
/// this benchmark, by name.
pub fn processes(dir: &Path, operator: u32) -> Vec<(String, u32)> {
    let mut found = vec![
        ("kubebao-operator".to_string(), operator),
        ("benchmark".to_string(), std::process::id()),
    ];
    let mut dirs = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for d in dirs {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let (Some(name), Some("pid")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            let pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|p| p.trim().parse().ok());
            if let Some(pid) = pid.filter(|p| *p != operator) {
                found.push((name.to_string(), pid));
            }
        }
    }
    found.sort();
    found
}

/// CPU seconds of each process at one moment.
pub fn cpu_snapshot(processes: &[(String, u32)]) -> Vec<f64> {
    processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect()
}

/// CPU used by each process between two snapshots ("name 12.3 s, …", busiest first) and
/// by all of them together, in seconds.
pub fn cpu_used(processes: &[(String, u32)], before: &[f64], after: &[f64]) -> (String, f64) {
    let mut used: Vec<(&str, f64)> = processes
        .iter()
        .zip(before.iter().zip(after))
        .map(|((name, _), (b, a))| (name.as_str(), a - b))
        .filter(|(_, s)| *s > 0.0)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    let text = used
        .iter()
        .map(|(n, s)| format!("{n} {s:.1} s"))
        .collect::<Vec<_>>()
        .join(", ");
    (text, used.iter().map(|(_, s)| s).sum())
}

/// A request (or its response) OpenBao audited.
pub struct Audited {
    /// API path without `/v1/`, e.g. `secret/metadata/<ns>/s1`.
    pub path: String,
    /// `read`, `update`, `list`, …
    pub operation: String,
    /// A response entry (with `failed`), not the request.
    pub response: bool,
    /// The response carries an error.
    pub failed: bool,
}

/// Where the audit log ends now: a mark for [`audited_since`].
pub fn audit_mark(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// The requests OpenBao audited between two marks (responses skipped). Reads only that part
/// of the log, which stays small even when the whole log is large.
pub fn audited_between(log: &Path, from: u64, to: u64) -> Vec<Audited> {
    let mut entries = audit_entries(log, from, to);
    entries.retain(|e| !e.response);
    entries
}

/// Requests and responses OpenBao audited between two marks.
pub fn audit_entries(log: &Path, from: u64, to: u64) -> Vec<Audited> {
    let mut file = std::fs::File::open(log).expect("open the OpenBao audit log");
    file.seek(SeekFrom::Start(from))
        .expect("seek the audit log");
    BufReader::new(file.take(to.saturating_sub(from)))
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
        .filter(|e| e["type"] == "request" || e["type"] == "response")
        .map(|e| Audited {
            path: e["request"]["path"].as_str().unwrap_or("").into(),
            operation: e["request"]["operation"].as_str().unwrap_or("").into(),
            response: e["type"] == "response",
            failed: e.get("error").is_some_and(|v| !v.is_null() && v != ""),
        })
        .collect()
}

/// Watches every BaoSecret and times when 10 %, 50 %, 90 % and all of them are Ready: of
/// all `n`, and of the `engines` that have an engine source (leased credentials).
pub struct ReadyWatch {
    progress: Arc<[Progress; 2]>,
    task: tokio::task::JoinHandle<()>,
}

/// How far one group got.
#[derive(Default)]
struct Progress {
    ready: AtomicUsize,
    /// (percent, time since start) for each mark reached.
    marks: Mutex<Vec<(usize, Duration)>>,
}

/// What the watch saw of one group: the marks (percent, time) reached, and how many are Ready.
pub type Readiness = (Vec<(usize, Duration)>, usize);

impl Progress {
    /// One more of `total` Ready at `at`.
    fn one_more(&self, total: usize, at: Duration) {
        let ready = self.ready.fetch_add(1, Ordering::Relaxed) + 1;
        for pct in [10, 50, 90, 100] {
            if ready == (total * pct).div_ceil(100).max(1) {
                self.marks.lock().expect("marks lock").push((pct, at));
            }
        }
    }

    fn readiness(&self) -> Readiness {
        let marks = self.marks.lock().expect("marks lock").clone();
        (marks, self.ready.load(Ordering::Relaxed))
    }
}

impl ReadyWatch {
    /// Starts watching; times count from `start`.
    pub fn start(api: Api<DynamicObject>, n: usize, engines: usize, start: Instant) -> Self {
        let progress: Arc<[Progress; 2]> = Arc::default();
        let shared = progress.clone();
        let task = tokio::spawn(async move {
            let mut seen = HashSet::new();
            let mut events = std::pin::pin!(
                watcher(api, watcher::Config::default())
                    .default_backoff()
                    .applied_objects()
            );
            while let Some(obj) = events.next().await {
                let Ok(obj) = obj else { continue };
                let key = format!(
                    "{}/{}",
                    obj.metadata.namespace.as_deref().unwrap_or_default(),
                    obj.metadata.name.as_deref().unwrap_or_default()
                );
                if !is_ready(&obj) || !seen.insert(key) {
                    continue;
                }
                shared[0].one_more(n, start.elapsed());
                if has_engine_source(&obj) {
                    shared[1].one_more(engines, start.elapsed());
                }
                if seen.len() >= n {
                    break;
                }
            }
        });
        Self { progress, task }
    }

    /// Waits at most `timeout` for all to be Ready, saying how many are every 30 s: what was
    /// seen of all, and of those with an engine source.
    pub async fn wait(mut self, n: usize, timeout: Duration) -> [Readiness; 2] {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let step = Duration::from_secs(30).min(deadline - Instant::now());
            if tokio::time::timeout(step, &mut self.task).await.is_ok() {
                break;
            }
            eprintln!(
                "  … {}/{n} Ready",
                self.progress[0].ready.load(Ordering::Relaxed)
            );
        }
        self.task.abort();
        [self.progress[0].readiness(), self.progress[1].readiness()]
    }
}

fn is_ready(obj: &DynamicObject) -> bool {
    obj.data["status"]["conditions"]
        .as_array()
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn has_engine_source(obj: &DynamicObject) -> bool {
    obj.data["spec"]["sources"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s.get("engine").is_some()))
}
