//! `splice(2)` for bulk tunnel traffic (Linux): bytes move socket → pipe → socket inside the kernel,
//! by page reference, instead of being copied into sluice and out again. [`super::tunnel`] switches a
//! direction over once it has carried bulk data; everywhere else the buffered copy runs.
//!
//! Measured with `cargo bench --bench tunnel` (one tunnel's throughput as a ratio to direct,
//! alternating builds on the same 2-core machine, 2026-11-25): 0.58-0.63× with the copy, 0.56-0.61×
//! with splice through default 64 KiB pipes, 0.72-0.81× with 1 MiB pipes.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::tunnel::{Meter, Side, shutdown_write};

/// A pipe between the two sockets of one direction. Its buffer holds pages only while bytes are in
/// flight; the kernel's default size (64 KiB) is kept, so many bulk tunnels stay within the per-user
/// pipe allowance.
const PIPE_SIZE: usize = 1 << 20;

pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    pub(super) fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two new descriptors into the array, which we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and nothing else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a pipe we own; a refusal (over the per-user pipe allowance) leaves the default.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        // SAFETY: F_GETPIPE_SZ only reads the pipe's size.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let size = usize::try_from(size).ok().filter(|&n| n > 0).unwrap_or(64 * 1024);
        Ok(Pipe { read, write, size })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice moves data between two descriptors we hold; no user memory is passed.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Moves `src` → `dst` until `src` ends (the EOF is passed on) or either side fails. The pipe is
/// emptied into `dst` before `src` is read again, so it never holds more than one read's worth.
pub(super) async fn pump(src: &TcpStream, dst: &TcpStream, pipe: Pipe, meter: &Meter<'_>) -> Result<(), Side> {
    loop {
        src.readable().await.map_err(|_| Side::Read)?;
        // try_io clears the readiness it waited for when the socket turns out to be dry.
        let n = match src.try_io(Interest::READABLE, || splice(src.as_raw_fd(), pipe.write.as_raw_fd(), pipe.size)) {
            Ok(0) => {
                shutdown_write(dst);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(Side::Read),
        };
        let mut left = n;
        while left > 0 {
            dst.writable().await.map_err(|_| Side::Write)?;
            match dst.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err(Side::Write),
            }
        }
        meter.record(n);
    }
}
