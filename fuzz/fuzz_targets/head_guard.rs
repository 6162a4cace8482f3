//! `HeadGuard` over arbitrary bytes: what hyper reads is a prefix of what the client sent; every head
//! in it ends exactly where httparse ends it (bare-LF heads included) and passes the framing rules;
//! a refusal reads as the end of the stream, and the end is final.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sluice::proxy::framing::{self, Framing};
use sluice::proxy::head::{HeadGuard, HeadLimits};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::runtime::Runtime;

/// Long timers: the fuzzer must never see a timeout refusal, only what the bytes cause.
const LIMITS: HeadLimits =
    HeadLimits { max_head: 1024, head_timeout: Duration::from_secs(3600), idle_timeout: Duration::from_secs(3600) };

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a current-thread runtime")
    })
}

/// Hands the input out `step` bytes at a time and is pending (already woken) before every other piece, as a
/// socket would be.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
    stall: bool,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.stall {
            self.stall = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.stall = true;
        let n = self.step.min(self.data.len()).min(out.remaining());
        out.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// Walks what the guard handed on as a parser behind it would: each head must end where httparse ends
/// it, use CRLF only, and pass the framing rules; bodies are skipped by their framing.
fn check_heads(out: &[u8]) {
    let mut at = 0;
    while at < out.len() {
        let rest = &out[at..];
        let mut scanned = 0;
        let Some(end) = framing::find_head_end(rest, &mut scanned) else { return };
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(rest) {
            Ok(httparse::Status::Complete(n)) => assert_eq!(n, end, "guard and parser disagree on a head's end"),
            other => panic!("the guard handed on a head httparse refuses: {other:?}"),
        }
        assert!(framing::check_line_endings(&rest[..end]).is_ok(), "a bare-LF head was handed on");
        match framing::framing(&req) {
            Ok(Framing::NoBody) => at += end,
            Ok(Framing::Length(n)) => at += end + usize::try_from(n).unwrap_or(usize::MAX).min(rest.len() - end),
            // Chunked bodies and tunnels: what follows is not heads.
            Ok(Framing::Chunked | Framing::Tunnel) => return,
            Err(r) => panic!("the guard handed on a head its own rules refuse: {}", r.message),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [step, window, input @ ..] = data else { return };
    let step = usize::from(step % 64) + 1;
    let window = usize::from(*window) % 512 + 1;
    let out = runtime().block_on(async {
        let mut guard = HeadGuard::new(Trickle { data: input, step, stall: false }, LIMITS);
        let mut out = Vec::new();
        let mut buf = vec![0u8; window];
        loop {
            let n = guard.read(&mut buf).await.expect("an in-memory stream does not fail");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            assert!(out.len() <= input.len(), "the guard hands on more than it was given");
        }
        // The end is final: hyper may read again after EOF.
        assert_eq!(guard.read(&mut buf).await.expect("an in-memory stream does not fail"), 0);
        out
    });
    assert!(input.starts_with(&out), "what the guard hands on is not a prefix of the input");
    check_heads(&out);
});
