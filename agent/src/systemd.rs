//! systemd service notifications (`sd_notify`), without a C library:
//! `READY=1` once the pipeline runs, `WATCHDOG=1` while it is healthy,
//! `STOPPING=1` on shutdown. Does nothing when not started by systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to systemd's notification socket.
pub struct Notifier {
    socket: UnixDatagram,
    path: std::ffi::OsString,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; `None` when not run by systemd (or the socket
    /// cannot be used, which is logged).
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        match UnixDatagram::unbound() {
            Ok(socket) => Some(Self { socket, path }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a socket for systemd notifications");
                None
            }
        }
    }

    /// Sends one notification, e.g. `READY=1`.
    pub fn notify(&self, state: &str) -> std::io::Result<()> {
        let bytes = self.path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket (Linux only).
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                self.socket.send_to_addr(state.as_bytes(), &addr)?;
                return Ok(());
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "abstract NOTIFY_SOCKET outside Linux",
                ));
            }
        }
        self.socket.send_to(state.as_bytes(), &self.path)?;
        Ok(())
    }
}

/// The watchdog period systemd expects (`WATCHDOG_USEC`), if enabled for
/// this process (`WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            socket: UnixDatagram::unbound().unwrap(),
            path: path.into_os_string(),
        };
        notifier.notify("READY=1").unwrap();
        notifier.notify("WATCHDOG=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_sockets_work() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("edge-agent-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier {
            socket: UnixDatagram::unbound().unwrap(),
            path: format!("@{name}").into(),
        };
        notifier.notify("STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
