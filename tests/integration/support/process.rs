//! Running the real `portico` binary: the environment cleared of what a
//! parent gateway would pass on, standard error captured line by line.

use std::ffi::OsStr;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// Starts `binary` with `args` and `env` (`PORTICO_LOG=info`; no
/// inherited-listener or readiness variables). Returns the child and its
/// standard error so far, collected by a thread that ends when every process
/// sharing the pipe has exited.
pub fn spawn<A, K, V>(binary: &OsStr, args: &[A], env: &[(K, V)]) -> (Child, Arc<Mutex<String>>)
where
    A: AsRef<OsStr>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .env("PORTICO_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("PORTICO_INHERITED_LISTENERS")
        .env_remove("PORTICO_UPGRADE_READY_FD")
        .env_remove("PORTICO_UPGRADE_PARENT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start portico");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (child, log)
}
