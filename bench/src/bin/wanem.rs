//! wanem: a wan emulator in user space, for kernels built without `sch_netem` (this machine's:
//! `tc qdisc add ... netem` answers "Specified qdisc kind is unknown").
//!
//! Relays Ethernet frames between two interfaces of the namespace it runs in, each way, after
//! `--delay-ms` and dropping `--loss-percent` of them at random, as netem's `delay` and `loss`
//! would on both egresses; a direction holding `--limit` frames drops the next (netem's
//! `limit`). Frames are read and written with their virtio-net header (`PACKET_VNET_HDR`), so
//! segmentation-offload frames cross whole and are cut into packets after, as they would be on
//! the wire; a frame dropped is then all the packets it carries, a burst, as on a link whose
//! loss is correlated. Put it between a bridge and a port taken off it:
//!
//! ```sh
//! ip link set w2gw nomaster
//! ip link add wd0 type veth peer name wd1 && ip link set wd1 master br-wan up && ip link set wd0 up
//! wanem --a w2gw --b wd0 --delay-ms 15 --loss-percent 1
//! ```

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

/// linux/if_packet.h: frames carry a struct virtio_net_hdr first.
const PACKET_VNET_HDR: libc::c_int = 15;
/// linux/if_packet.h: a socket does not read back the frames sent out of its interface.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// The largest frame read: a 64 KiB offload frame, its Ethernet and virtio-net headers.
const FRAME: usize = 70 * 1024;
/// The kernel buffers each socket asks for.
const SOCKET_BUFFER: libc::c_int = 32 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(name = "wanem", about = "Delay and loss between two interfaces, in user space")]
struct Cli {
    #[arg(long)]
    a: String,
    #[arg(long)]
    b: String,
    /// Added to every frame, each way.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Frames dropped at random, each way.
    #[arg(long, default_value_t = 0.0)]
    loss_percent: f64,
    /// Frames held at most per direction.
    #[arg(long, default_value_t = 100_000)]
    limit: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        (0.0..=100.0).contains(&cli.loss_percent),
        "--loss-percent must be 0 to 100, not {}",
        cli.loss_percent
    );
    anyhow::ensure!(cli.limit > 0, "--limit must be at least 1");
    let a = Arc::new(packet_socket(&cli.a)?);
    let b = Arc::new(packet_socket(&cli.b)?);
    let delay = Duration::from_millis(cli.delay_ms);
    let drop_below = (cli.loss_percent / 100.0 * u32::MAX as f64) as u32;
    std::thread::scope(|s| {
        let ab = s.spawn(|| direction(&a, &b, delay, drop_below, cli.limit, 0x9e37_79b9));
        let ba = s.spawn(|| direction(&b, &a, delay, drop_below, cli.limit, 0x85eb_ca6b));
        let first = ab
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a relay thread panicked")));
        let second = ba
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a relay thread panicked")));
        first.and(second)
    })
}

/// An AF_PACKET socket bound to `ifname`, every protocol, with virtio-net headers.
fn packet_socket(ifname: &str) -> anyhow::Result<OwnedFd> {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain syscalls on a descriptor this function owns; the option values and the
    // address are valid for the lengths given.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(all));
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("an AF_PACKET socket (needs root)");
        }
        let fd = OwnedFd::from_raw_fd(fd);
        for (level, name, value) in [
            (libc::SOL_PACKET, PACKET_VNET_HDR, 1),
            (libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1),
            (libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, SOCKET_BUFFER),
            (libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, SOCKET_BUFFER),
        ] {
            set(fd.as_raw_fd(), level, name, value).with_context(|| format!("socket option {name} on {ifname}"))?;
        }
        let name = CString::new(ifname).context("an interface name without NUL")?;
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            bail!("no interface {ifname} in this namespace");
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = index as i32;
        if libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("binding to {ifname}"));
        }
        Ok(fd)
    }
}

/// # Safety
/// `fd` is an open socket.
unsafe fn set(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    let r = libc::setsockopt(
        fd,
        level,
        name,
        (&value as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
    );
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Frames from `from` to `to`: read, maybe dropped, held until `delay` after they were read,
/// written. The writer is a thread of its own, so reading never waits on a held frame.
fn direction(
    from: &OwnedFd,
    to: &OwnedFd,
    delay: Duration,
    drop_below: u32,
    limit: usize,
    seed: u32,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(limit);
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> anyhow::Result<()> {
            for (due, frame) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                // SAFETY: a valid descriptor and a buffer of the length given.
                let n = unsafe { libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    // A frame the interface will not take is lost, as on a wire; the link goes on.
                    if e.raw_os_error() == Some(libc::ENETDOWN) || e.raw_os_error() == Some(libc::ENXIO) {
                        return Err(e).context("the interface went away");
                    }
                }
            }
            Ok(())
        });
        let mut random = seed | 1;
        let mut buf = vec![0u8; FRAME];
        loop {
            // SAFETY: a valid descriptor and a buffer of the length given.
            let n = unsafe { libc::recv(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                drop(tx);
                let _ = writer.join();
                return Err(e).context("reading a frame");
            }
            // xorshift32: enough to pick frames to drop.
            random ^= random << 13;
            random ^= random >> 17;
            random ^= random << 5;
            if random < drop_below {
                continue;
            }
            let frame = buf[..n as usize].to_vec();
            match tx.try_send((Instant::now() + delay, frame)) {
                Ok(()) | Err(mpsc::TrySendError::Full(_)) => {}
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    return writer
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("the writer panicked")));
                }
            }
        }
    })
}
