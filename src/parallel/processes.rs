//! Ranks as processes: rank 0 runs in the launching process, ranks 1..N each
//! in a process of their own, started from this executable with the hidden
//! `rank-worker` command and handed their part of the run on standard input.
//! Each worker ends by printing a [`WorkerReport`] on standard output.
//!
//! A watcher thread follows the workers: the first one that fails (an error,
//! a panic, a kill) aborts rank 0's side of the group, so rank 0 stops
//! instead of waiting for it, and the remaining workers are killed. Workers
//! run in their own process group, so a Ctrl-C at the terminal reaches rank 0
//! only; the ranks agree on stopping through the group itself.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

/// How a worker's run ended, as it prints it on standard output.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// The run stopped at Ctrl-C (every rank agreed to stop).
    pub interrupted: bool,
    /// The failure, if the run failed.
    pub message: Option<String>,
}

/// One started worker.
struct Worker {
    rank: usize,
    child: Child,
    /// Collects the worker's standard output (its report) as it comes.
    stdout: Option<JoinHandle<String>>,
}

/// The workers of a group, ranks 1..N.
pub struct Workers {
    workers: Arc<Mutex<Vec<Worker>>>,
}

/// The name of the hidden command that runs one rank.
pub const WORKER_COMMAND: &str = "rank-worker";

impl Workers {
    /// Starts `exe rank-worker` once per `(rank, spec)`, writing the spec to
    /// its standard input, with a rayon pool of `threads` threads each when
    /// given (`RAYON_NUM_THREADS`). On an error the workers started so far
    /// are killed.
    pub fn spawn(exe: &Path, specs: Vec<(usize, Vec<u8>)>, threads: Option<usize>) -> Result<Self> {
        let started = Self {
            workers: Arc::new(Mutex::new(Vec::with_capacity(specs.len()))),
        };
        for (rank, spec) in specs {
            let mut command = Command::new(exe);
            command
                .arg(WORKER_COMMAND)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .process_group(0);
            if let Some(n) = threads {
                command.env("RAYON_NUM_THREADS", n.to_string());
            }
            die_with_launcher(&mut command);
            let mut child = command
                .spawn()
                .with_context(|| format!("cannot start rank {rank} ({})", exe.display()))?;
            let mut stdin = child.stdin.take().expect("piped stdin");
            let written = stdin.write_all(&spec);
            drop(stdin);
            let mut out = child.stdout.take().expect("piped stdout");
            let stdout = std::thread::spawn(move || {
                let mut text = String::new();
                let _ = out.read_to_string(&mut text);
                text
            });
            started.lock().push(Worker {
                rank,
                child,
                stdout: Some(stdout),
            });
            written.with_context(|| format!("cannot hand rank {rank} its part"))?;
        }
        Ok(started)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails with a worker's report if one has already ended (while the
    /// group is still being set up).
    pub fn check_running(&self) -> Result<()> {
        let mut workers = self.lock();
        for w in workers.iter_mut() {
            if let Some(status) = w.child.try_wait()? {
                let report = w.report(status);
                return Err(anyhow!(
                    "rank {} ended before joining the group: {}",
                    w.rank,
                    report.message.unwrap_or_else(|| "it exited".into())
                ));
            }
        }
        Ok(())
    }

    /// Starts watching the workers: the first that ends with a failure
    /// while the group runs calls `on_failure(rank)` and kills the others.
    /// Returns the watcher, which [`Watcher::finish`] ends.
    pub fn watch(self, on_failure: impl FnOnce(usize) + Send + 'static) -> Watcher {
        let workers = Arc::clone(&self.workers);
        let done = Arc::new(Mutex::new(false));
        let first_failure = Arc::new(Mutex::new(None));
        let thread = {
            let (done, first_failure) = (Arc::clone(&done), Arc::clone(&first_failure));
            std::thread::spawn(move || {
                let mut on_failure = Some(on_failure);
                loop {
                    let finished = *done.lock().unwrap_or_else(|e| e.into_inner());
                    let mut ws = workers.lock().unwrap_or_else(|e| e.into_inner());
                    let mut failed = None;
                    let mut running = 0;
                    for w in ws.iter_mut() {
                        match w.child.try_wait() {
                            Ok(Some(status)) if !status.success() => {
                                failed.get_or_insert(w.rank);
                            }
                            Ok(Some(_)) => {}
                            _ => running += 1,
                        }
                    }
                    if let Some(rank) = failed {
                        let mut first = first_failure.lock().unwrap_or_else(|e| e.into_inner());
                        if first.is_none() {
                            *first = Some(rank);
                            for w in ws.iter_mut() {
                                let _ = w.child.kill();
                            }
                            drop(ws);
                            if let Some(f) = on_failure.take() {
                                f(rank);
                            }
                            continue;
                        }
                    }
                    if running == 0 || finished {
                        return;
                    }
                    drop(ws);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Watcher {
            workers: self,
            done,
            first_failure,
            thread: Some(thread),
        }
    }
}

/// Makes the worker die with the thread that starts it (the launcher's,
/// which waits for the workers), so that a launcher killed outright leaves
/// no worker behind, waiting in NCCL for ever.
#[cfg(target_os = "linux")]
fn die_with_launcher(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Elsewhere a killed launcher's workers notice through the group.
#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_: &mut Command) {}

impl Worker {
    /// The worker's report once it has exited with `status`.
    fn report(&mut self, status: ExitStatus) -> WorkerReport {
        // The output ends when the process has; a process it started could
        // still hold the pipe, so the wait is bounded.
        let deadline = Instant::now() + Duration::from_secs(2);
        let text = match self.stdout.take() {
            Some(h) => {
                while !h.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if h.is_finished() {
                    h.join().unwrap_or_default()
                } else {
                    String::new()
                }
            }
            None => String::new(),
        };
        let parsed = text
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str::<WorkerReport>(line).ok());
        match parsed {
            Some(report) => report,
            None if status.success() => WorkerReport::default(),
            None => WorkerReport {
                interrupted: false,
                message: Some(format!("rank {} exited with {status}", self.rank)),
            },
        }
    }
}

/// Follows the workers while rank 0 runs.
pub struct Watcher {
    workers: Workers,
    done: Arc<Mutex<bool>>,
    first_failure: Arc<Mutex<Option<usize>>>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// The first worker that failed, if any did.
    pub fn first_failure(&self) -> Option<usize> {
        *self.first_failure.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After rank 0 ended: waits up to `grace` for the workers to end too,
    /// kills those that did not, and returns each worker's report by rank.
    pub fn finish(mut self, grace: Duration) -> Vec<(usize, WorkerReport)> {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut workers = self.workers.lock();
        let deadline = Instant::now() + grace;
        let mut reports = Vec::with_capacity(workers.len());
        for w in workers.iter_mut() {
            let status = loop {
                match w.child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        let _ = w.child.kill();
                        break w.child.wait().ok();
                    }
                }
            };
            let report = match status {
                Some(status) => w.report(status),
                None => WorkerReport {
                    interrupted: false,
                    message: Some(format!("rank {} could not be waited for", w.rank)),
                },
            };
            reports.push((w.rank, report));
        }
        reports
    }
}

impl Drop for Workers {
    /// No worker outlives the launcher (an error on the way, a panic).
    fn drop(&mut self) {
        for w in self.lock().iter_mut() {
            if matches!(w.child.try_wait(), Ok(None)) {
                let _ = w.child.kill();
                let _ = w.child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A stand-in worker program: reads its part; `fail` prints a failure
    /// report and exits 1, `ok` reports success, anything else waits.
    fn fake_worker(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("worker.sh");
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(
            f,
            "#!/bin/sh\nread part\ncase \"$part\" in\n\
             fail) echo '{{\"interrupted\":false,\"message\":\"boom\"}}'; exit 1;;\n\
             ok) echo '{{\"interrupted\":false,\"message\":null}}'; exit 0;;\n\
             *) exec sleep 60;;\nesac"
        )
        .unwrap();
        drop(f);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn part(text: &str) -> Vec<u8> {
        format!("{text}\n").into_bytes()
    }

    #[test]
    fn a_failing_worker_is_reported_and_the_others_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let exe = fake_worker(dir.path());
        let workers =
            Workers::spawn(&exe, vec![(1, part("wait")), (2, part("fail"))], Some(1)).unwrap();
        let failed = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&failed);
        let watcher = workers.watch(move |rank| seen.store(rank, Ordering::SeqCst));
        let start = Instant::now();
        while failed.load(Ordering::SeqCst) == 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "no failure seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(failed.load(Ordering::SeqCst), 2);
        assert_eq!(watcher.first_failure(), Some(2));
        let reports = watcher.finish(Duration::from_secs(5));
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the waiting worker was killed"
        );
        assert_eq!(reports[1].1.message.as_deref(), Some("boom"));
        let killed = reports[0].1.message.as_deref().unwrap_or_default();
        assert!(killed.contains("rank 1 exited"), "{killed}");
    }

    #[test]
    fn workers_that_end_early_or_finish_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let exe = fake_worker(dir.path());
        let workers = Workers::spawn(&exe, vec![(1, part("fail"))], None).unwrap();
        let start = Instant::now();
        let err = loop {
            if let Err(e) = workers.check_running() {
                break e.to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the worker did not end"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            err.contains("rank 1 ended before joining") && err.contains("boom"),
            "{err}"
        );

        let workers = Workers::spawn(&exe, vec![(1, part("ok")), (2, part("ok"))], None).unwrap();
        let watcher = workers.watch(|rank| panic!("rank {rank} did not fail"));
        let reports = watcher.finish(Duration::from_secs(10));
        assert_eq!(reports.len(), 2);
        assert!(
            reports.iter().all(|(_, r)| *r == WorkerReport::default()),
            "{reports:?}"
        );
    }
}
