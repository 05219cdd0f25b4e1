//! Loopback ports and a minimal HTTP/1.1 request (no client crate needed for
//! a loopback GET).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// A port that was free (TCP and UDP) a moment ago on 127.0.0.1, for a
/// process the caller starts next.
///
/// It is drawn below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), never from it: a port the
/// kernel handed out as free is the next one it hands to any outgoing
/// connection (tests open thousands), so a child that binds it a moment later
/// can find it taken (seen as a Consul agent that never elected itself
/// leader: its serf port was in use). Ports are drawn in turn from a
/// per-process random start, so concurrent tests in one process never draw
/// the same one.
pub fn free_port() -> u16 {
    use std::net::UdpSocket;
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (from, span) = (10_000u32, low.saturating_sub(10_000));
    if span >= 1000 {
        let seed = std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        let _ = NEXT.compare_exchange(0, seed % span + 1, Ordering::Relaxed, Ordering::Relaxed);
        for _ in 0..span {
            let port = (from + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
            let tcp = TcpListener::bind(("127.0.0.1", port));
            let udp = UdpSocket::bind(("127.0.0.1", port));
            if tcp.is_ok() && udp.is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port on 127.0.0.1")
}

/// One HTTP/1.1 request with an empty body to `addr`, `Connection: close`;
/// answers (status, the whole response as text). Status 0 when nothing
/// listens there or the answer is not HTTP.
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_can_be_bound_and_nothing_answers_there() {
        let port = free_port();
        assert_ne!(port, 0);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(http(addr, "GET", "/", &[]).0, 0);
    }
}
