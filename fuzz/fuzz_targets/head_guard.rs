//! `HeadGuard` over arbitrary bytes: what hyper reads is a prefix of what the client sent, then at most one
//! synthetic refusal request, and the stream ends.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sluice::proxy::head::{HeadGuard, HeadLimits, parse_refusal};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::runtime::Runtime;

/// Long timers: the fuzzer must never see a timeout refusal, only what the bytes cause.
const LIMITS: HeadLimits =
    HeadLimits { max_head: 1024, head_timeout: Duration::from_secs(3600), idle_timeout: Duration::from_secs(3600) };

/// The longest synthetic refusal (its detail is capped at 300 characters).
const MAX_REFUSAL: usize = 1024;

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

/// Whether `bytes` is exactly one synthetic refusal request, with this process's secret path.
fn is_refusal(bytes: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(n)) = req.parse(bytes) else { return false };
    if n != bytes.len() || req.method != Some("GET") {
        return false;
    }
    let header = |name: &str| req.headers.iter().find(|h| h.name == name).map(|h| h.value);
    let detail = header("X-Sluice-Detail").and_then(|v| std::str::from_utf8(v).ok());
    req.headers.len() == 3
        && header("Host") == Some(b"sluice")
        && header("Connection") == Some(b"close")
        && parse_refusal(req.path.unwrap_or(""), detail).is_some()
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
            assert!(out.len() <= input.len() + MAX_REFUSAL, "the guard hands on more than it was given");
        }
        // The end is final: hyper may read again after EOF.
        assert_eq!(guard.read(&mut buf).await.expect("an in-memory stream does not fail"), 0);
        out
    });
    let same = input.iter().zip(&out).take_while(|(a, b)| a == b).count();
    if same == out.len() {
        return;
    }
    // Otherwise a refusal follows a prefix of the input; it starts at or before the first difference.
    let marker = b"GET /.sluice-refusal-";
    let refused = (0..=same).any(|p| out[p..].starts_with(marker) && is_refusal(&out[p..]));
    assert!(
        refused,
        "output is neither a prefix of the input nor a prefix plus one refusal:\ninput:  {:?}\noutput: {:?}",
        String::from_utf8_lossy(input),
        String::from_utf8_lossy(&out)
    );
});
