//! How pods on the pod network reach what runs on the host's loopback (the API server,
//! OpenBao): a service address on the host's `lo` and a TCP forwarder per port — what kube-proxy
//! does for the `kubernetes` Service, without iptables rules or IP forwarding.
//!
//! Pods get `KUBERNETES_SERVICE_HOST=10.96.0.1` (the first address of the API server's
//! `--service-cluster-ip-range`) from the kubelet, as in any cluster. Their packets to it reach
//! the host over the pod bridge, and the host delivers them locally because the address is its
//! own; nothing leaves the machine.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::host::run;

/// The `kubernetes` Service's cluster IP, on the host's loopback interface while a node runs.
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// Adds [`SERVICE_IP`] to `lo` (the node's host restore removes it).
pub(crate) fn add_service_ip() {
    assert!(
        run(
            "ip",
            &["addr", "replace", &format!("{SERVICE_IP}/32"), "dev", "lo"]
        ),
        "cannot add the pods' service address {SERVICE_IP} to lo"
    );
}

/// Forwards `SERVICE_IP:<port>` to a host address until dropped.
pub struct Forwarder {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on `SERVICE_IP:port` and forwards every connection to `target`.
    pub fn start(port: u16, target: SocketAddr) -> Forwarder {
        let address = SocketAddr::from((SERVICE_IP, port));
        let listener = TcpListener::bind(address)
            .unwrap_or_else(|e| panic!("cannot listen on {address} for pods: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(conn) = conn {
                    std::thread::spawn(move || forward(conn, target));
                }
            }
        });
        Forwarder {
            address,
            stop,
            thread: Some(thread),
        }
    }

    /// Where pods connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.address);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies both directions until either side closes.
fn forward(client: TcpStream, target: SocketAddr) {
    let Ok(server) = TcpStream::connect(target) else {
        return;
    };
    let (Ok(client_read), Ok(server_write)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let upstream = std::thread::spawn(move || copy(client_read, server_write));
    copy(server, client);
    let _ = upstream.join();
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
