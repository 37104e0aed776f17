//! Child processes that cannot outlive the test process.
//!
//! Each component runs under a tiny `sh` guard that holds the read end of a pipe from us.
//! When we close it (stop) or die for any reason (panic, abort, SIGKILL: the kernel closes
//! it), the guard sends SIGTERM to the component, and SIGKILL 5 s later (kube-apiserver
//! can hang in graceful shutdown once etcd is gone). No `unsafe` needed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

const GUARD: &str = r#"
exec 3<&0
"$@" 3<&- </dev/null &
pid=$!
echo "$pid" > "$KUBEBAO_PIDFILE"
( cat <&3 >/dev/null; kill -TERM "$pid" 2>/dev/null; sleep 5; kill -KILL "$pid" 2>/dev/null ) &
wait "$pid"
"#;

/// A running component (etcd, kube-apiserver, OpenBao, an agent under test, …).
pub struct Component {
    name: String,
    command_line: String,
    log: PathBuf,
    pidfile: PathBuf,
    guard: Child,
    lifeline: Option<ChildStdin>,
}

impl Component {
    /// Starts `program args…`, logging stdout and stderr to `<dir>/<name>.log`.
    pub fn start(name: &str, dir: &Path, program: &Path, args: &[String]) -> Self {
        Self::start_with_env(name, dir, program, args, &[])
    }

    /// Like `start`, with extra environment variables.
    pub fn start_with_env(
        name: &str,
        dir: &Path,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let pidfile = dir.join(format!("{name}.pid"));
        let _ = std::fs::remove_file(&pidfile);
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open component log");
        let err = out.try_clone().expect("clone log handle");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(GUARD)
            .arg("guard")
            .arg(program)
            .args(args);
        cmd.env("KUBEBAO_PIDFILE", &pidfile);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped()).stdout(out).stderr(err);
        let mut guard = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", program.display()));
        let lifeline = guard.stdin.take();
        let command_line = std::iter::once(program.display().to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            name: name.into(),
            command_line,
            log,
            pidfile,
            guard,
            lifeline,
        }
    }

    /// The component's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the component's log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the component is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.guard.try_wait(), Ok(None))
    }

    /// The pid of the component itself (not the guard), once it has started.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// A readable report for a failed start: command line, exit state and the last log lines.
    pub fn report(&mut self) -> String {
        let state = match self.guard.try_wait() {
            Ok(Some(status)) => format!("exited ({status})"),
            Ok(None) => "still running".into(),
            Err(e) => format!("unknown ({e})"),
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!(
            "{} {state}\ncommand: {}\nlast log lines ({}):\n{}",
            self.name,
            self.command_line,
            self.log.display(),
            tail.join("\n")
        )
    }

    /// Panics with `report()` if the component has exited: waiting longer cannot help.
    pub fn assert_running(&mut self) {
        if !self.is_running() {
            let report = self.report();
            panic!("{} failed to start or died:\n{report}", self.name);
        }
    }

    /// Stops the component (SIGTERM, then SIGKILL after 15 s) and waits for it.
    pub fn stop(&mut self) {
        self.lifeline.take();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Kills the component at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        self.lifeline.take();
        let _ = self.guard.kill();
        let _ = self.guard.wait();
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        // A failing test shows what each of its components last said (the logs live in a
        // temporary directory that is removed with the test bed).
        if std::thread::panicking() {
            eprintln!("\n{}\n", self.report());
        }
        self.stop();
    }
}
