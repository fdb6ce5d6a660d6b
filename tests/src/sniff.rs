//! A packet sniffer for the lab's wire: an `AF_PACKET` socket opened inside a network
//! namespace, seeing every frame on every interface there (the underlay's bridge ports, i.e.
//! everything that travels between nodes). Only IPv4/TCP is decoded.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One TCP segment seen on the wire.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
}

impl Segment {
    /// Whether the payload contains `needle`.
    pub fn carries(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.payload.windows(needle.len()).any(|w| w == needle)
    }
}

/// A running capture; [`stop`](Self::stop) returns what it saw.
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<Vec<Segment>>>>,
}

impl Sniffer {
    /// Starts capturing in network namespace `netns` (a name under /run/netns).
    pub fn start(netns: &str) -> io::Result<Self> {
        let path = format!("/run/netns/{netns}");
        let ns = std::fs::File::open(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let socket = match open_in(&ns) {
                Ok(socket) => {
                    let _ = ready_tx.send(Ok(()));
                    socket
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            };
            let mut seen = Vec::new();
            let mut frame = vec![0u8; 65536];
            while !flag.load(Ordering::Acquire) {
                // SAFETY: `frame` is a valid writable buffer of the given length.
                let n = unsafe { libc::recv(socket.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len(), 0) };
                if n <= 0 {
                    continue; // timeout (SO_RCVTIMEO) or EINTR: check the flag again
                }
                if let Some(segment) = decode(&frame[..n as usize]) {
                    seen.push(segment);
                }
            }
            Ok(seen)
        });
        ready_rx.recv().map_err(|_| io::Error::other("sniffer thread died"))??;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns every TCP segment seen.
    pub fn stop(mut self) -> Vec<Segment> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Ok(seen))) => seen,
            other => panic!("sniffer failed: {other:?}"),
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn open_in(ns: &std::fs::File) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls on valid descriptors; this thread alone moves into the namespace.
    unsafe {
        if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(fd);
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        Ok(socket)
    }
}

/// Ethernet II → IPv4 → TCP.
fn decode(frame: &[u8]) -> Option<Segment> {
    if frame.len() < 14 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let tcp = ip.get(ihl..total)?;
    if tcp.len() < 20 {
        return None;
    }
    let offset = usize::from(tcp[12] >> 4) * 4;
    Some(Segment {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        payload: tcp.get(offset..)?.to_vec(),
    })
}
