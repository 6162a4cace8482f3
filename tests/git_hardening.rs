//! The git listener against hostile request bodies and heads, through raw sockets on 127.0.0.1 port 0:
//! a gzip bomb that decodes to nothing, a command list dribbled out past its deadline, a command list
//! in thousands of tiny frames, and framing headers spelled with `_`. None of them may reach upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sluice::credential::{Claims, Keyring, SigningKey, now_unix};
use sluice::git::{GitProxy, GitSettings, TokenSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CANARY: &str = "ghs_CanaryHardeningToken0123456789abcdef";
const SID: &str = "sess-h";
const BRANCH: &str = "feature";
/// What sluice reads of a push body, at most, before the command list must be complete.
const Z40: &str = "0000000000000000000000000000000000000000";
const RAW_CAP: usize = 2 << 20;

#[path = "support/capture.rs"]
mod capture;
use capture::audit;

#[path = "support/cgi.rs"]
#[allow(dead_code)]
mod cgi;
use cgi::{UpstreamState, spawn_upstream};

struct World {
    dir: std::path::PathBuf,
    upstream: Arc<UpstreamState>,
    sluice: SocketAddr,
    keyring: Keyring,
    owner: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl World {
    async fn new(name: &str, body_timeout: Duration) -> World {
        audit();
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluice-hardening-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root")).unwrap();
        std::fs::create_dir_all(dir.join("home")).unwrap();
        let upstream = Arc::new(UpstreamState {
            root: dir.join("root"),
            home: dir.join("home"),
            token: Some(CANARY.to_owned()),
            ..UpstreamState::default()
        });
        let up_addr = spawn_upstream(upstream.clone()).await;
        let owner = format!("h-{name}");
        let token_file = dir.join("real-token");
        std::fs::write(&token_file, format!("{CANARY}\n")).unwrap();
        let mut settings = GitSettings {
            upstream: format!("http://{up_addr}"),
            token_env: None,
            body_timeout: sluice::config::Seconds(body_timeout),
            ..GitSettings::default()
        };
        settings.tokens.insert(owner.clone(), TokenSource::File(token_file));
        let keyring = Keyring::new(SigningKey::from_bytes(&[44u8; 32]).unwrap(), None);
        let proxy = Arc::new(GitProxy::new(&settings, Some(keyring.clone())).unwrap().with_audit(audit().clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sluice = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = sluice::listen::Shutdown::default();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = rx.await;
            stop.drain(std::time::Duration::from_secs(5)).await;
        });
        tokio::spawn(sluice::git::serve(listener, proxy, shutdown));
        World { dir, upstream, sluice, keyring, owner, shutdown: Some(tx) }
    }

    fn repo(&self) -> String {
        format!("{}/widgets", self.owner)
    }

    /// `SESSION:CREDENTIAL` for this repository, base64 for a Basic header.
    fn good(&self) -> String {
        let now = now_unix();
        STANDARD
            .encode(format!("{SID}:{}", self.keyring.mint(&Claims::git(SID, &self.repo(), BRANCH, now, now + 3600))))
    }

    fn bogus(&self) -> String {
        STANDARD.encode(format!("{SID}:v1.bogus.credential"))
    }

    /// A chunked receive-pack POST head.
    fn push_head(&self, auth: &str, extra: &str) -> String {
        format!(
            "POST /{}.git/git-receive-pack HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n{extra}\
             Content-Type: application/x-git-receive-pack-request\r\nTransfer-Encoding: chunked\r\n\r\n",
            self.repo()
        )
    }

    fn assert_nothing_went_upstream(&self) {
        assert_eq!(self.upstream.requests.load(Ordering::SeqCst), 0, "a request reached the upstream");
    }

    fn log_lines(&self) -> Vec<String> {
        let text = capture::text();
        assert!(!text.contains(CANARY), "the real token leaked into the log");
        capture::lines_for_repo(&text, &self.repo())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One HTTP/1.1 chunk.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

fn pkt(s: &[u8]) -> Vec<u8> {
    let mut v = format!("{:04x}", s.len() + 4).into_bytes();
    v.extend_from_slice(s);
    v
}

/// A gzip member header (no name, no extra), as `git` and zlib write it.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// An empty, non-final stored deflate block: five bytes that decode to nothing.
const EMPTY_BLOCK: [u8; 5] = [0, 0, 0, 0xff, 0xff];

/// `n` empty stored blocks in one chunk.
fn bomb_chunk(n: usize) -> Vec<u8> {
    chunk(&EMPTY_BLOCK.repeat(n))
}

/// Reads one whole response (sluice closes after a refused push or a 400), within `limit`.
async fn read_response(s: &mut TcpStream, limit: Duration) -> (u16, String, Vec<u8>) {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("no complete answer within {limit:?}; got {:?}", String::from_utf8_lossy(&out)),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
        if let Some(done) = complete(&out) {
            out.truncate(done);
            break;
        }
    }
    assert!(!out.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()), "the real token reached the client");
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    let status = head[9..12].parse().unwrap();
    let body = decode_body(&head, &out[end + 4..]);
    (status, head, body)
}

/// The length of a complete response in `out`, when it is complete (Content-Length or chunked).
fn complete(out: &[u8]) -> Option<usize> {
    let end = out.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
    if let Some(len) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
        let len: usize = len.trim().parse().ok()?;
        return (out.len() >= end + len).then_some(end + len);
    }
    if head.contains("transfer-encoding: chunked") {
        return out[end..].windows(5).position(|w| w == b"0\r\n\r\n").map(|i| end + i + 5);
    }
    None
}

fn decode_body(head: &str, body: &[u8]) -> Vec<u8> {
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return body.to_vec();
    }
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
        let len = usize::from_str_radix(std::str::from_utf8(&rest[..i]).unwrap().trim(), 16).unwrap();
        if len == 0 {
            break;
        }
        out.extend_from_slice(&rest[i + 2..i + 2 + len]);
        rest = &rest[i + 4 + len..];
    }
    out
}

/// The peak resident set of this test process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn fatal(message: &str) -> String {
    let line = format!("ERR {message}\n");
    format!("{:04x}{line}", line.len() + 4)
}

const RAW_CAP_MESSAGE: &str = "sluice: the push body's first 2048 KiB did not complete its command list (0 bytes \
     decoded); a command list is at most 1024 KiB, gzip-encoded or not";

// ---------- hole 1: a gzip body that decodes to nothing ----------

/// The bomb, paced: sluice must decide after at most the raw cap, with or without a valid credential,
/// while the client has sent only a little more than that and waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_is_refused_after_the_raw_cap() {
    let w = World::new("bomb", Duration::from_secs(10)).await;
    for (auth, answer) in [
        (w.bogus(), fatal("sluice: git credential refused: malformed credential: signature is not base64url")),
        (w.good(), fatal(RAW_CAP_MESSAGE)),
    ] {
        let mut s = TcpStream::connect(w.sluice).await.unwrap();
        s.write_all(w.push_head(&auth, "Content-Encoding: gzip\r\n").as_bytes()).await.unwrap();
        s.write_all(&chunk(&GZIP_HEADER)).await.unwrap();
        // The cap and 256 KiB more, then silence (well within the body timeout).
        let mut sent = GZIP_HEADER.len();
        while sent < RAW_CAP + (256 << 10) {
            s.write_all(&bomb_chunk(4096)).await.unwrap();
            sent += 4096 * EMPTY_BLOCK.len();
        }
        let started = Instant::now();
        let (status, head, body) = read_response(&mut s, Duration::from_secs(8)).await;
        assert!(started.elapsed() < Duration::from_secs(8));
        assert_eq!((status, String::from_utf8_lossy(&body).as_ref()), (200, answer.as_str()), "{head}");
        assert!(head.contains("application/x-git-receive-pack-result"), "{head}");
    }
    w.assert_nothing_went_upstream();
    let lines = w.log_lines();
    assert!(
        lines.iter().any(|l| l.contains("verdict=deny")
            && l.contains("reason=push_list_too_large ")
            && l.contains(&format!("detail={:?}", RAW_CAP_MESSAGE.strip_prefix("sluice: ").unwrap()))),
        "{lines:#?}"
    );
}

/// The bomb at full speed, 128 MiB of it: sluice answers, throws the rest away, and its memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_gzip_bomb_does_not_grow_memory() {
    const TOTAL: usize = 128 << 20;
    let w = World::new("fastbomb", Duration::from_secs(10)).await;
    let before = peak_rss_kib();
    let s = TcpStream::connect(w.sluice).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let head = w.push_head(&w.bogus(), "Content-Encoding: gzip\r\n");
    let writer = tokio::spawn(async move {
        let blocks = bomb_chunk(13_000);
        let mut sent = 0usize;
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&chunk(&GZIP_HEADER)).await;
        while sent < TOTAL {
            if wr.write_all(&blocks).await.is_err() {
                break;
            }
            sent += blocks.len();
        }
        let _ = wr.write_all(b"0\r\n\r\n").await;
        sent
    });
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if complete(&out).is_some() {
                break;
            }
        }
    })
    .await;
    assert!(answered.is_ok(), "no answer within 60s");
    let sent = tokio::time::timeout(Duration::from_secs(60), writer).await.expect("the writer finishes").unwrap();
    let grown = peak_rss_kib().saturating_sub(before);
    eprintln!("fast gzip bomb: {} MiB sent, peak RSS grew {grown} KiB", sent >> 20);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.ends_with(&fatal("sluice: git credential refused: malformed credential: signature is not base64url")),
        "{text}"
    );
    assert!(grown < 48 << 10, "peak RSS grew {grown} KiB while a {} MiB bomb was read", sent >> 20);
    w.assert_nothing_went_upstream();
}

/// A command list dribbled out, each piece within the body timeout, is refused at its deadline
/// (twice the body timeout), in words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dribbled_command_list_is_refused_at_its_deadline() {
    let w = World::new("dribble", Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(w.sluice).await.unwrap();
    s.write_all(w.push_head(&w.good(), "Content-Encoding: gzip\r\n").as_bytes()).await.unwrap();
    s.write_all(&chunk(&GZIP_HEADER)).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        // Bounded: 40 pieces, 400 ms apart (16 s), far past the 2 s deadline.
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            if wr.write_all(&bomb_chunk(1)).await.is_err() {
                break;
            }
        }
        wr
    });
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while complete(&out).is_none() {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let took = started.elapsed();
    writer.abort();
    let text = String::from_utf8_lossy(&out);
    let message = "sluice: the push's command list did not arrive within 2s (twice [git] body_timeout); \
                   send it without pauses";
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with(&fatal(message)), "{text}");
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(10), "answered after {took:?}");
    w.assert_nothing_went_upstream();
}

// ---------- hole 2: thousands of tiny frames ----------

/// 900 KiB of command list in one frame, then the rest one byte per chunk: every byte is looked at a
/// bounded number of times, so the answer comes quickly (the old reader re-parsed the whole buffer
/// for every chunk, some milliseconds each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_list_in_tiny_frames_is_read_once() {
    let w = World::new("tiny", Duration::from_secs(30)).await;
    let shallow = |i: usize| pkt(format!("shallow {i:040x}").as_bytes());
    let mut list = Vec::new();
    let mut i = 0;
    while list.len() < 900 << 10 {
        list.extend(shallow(i));
        i += 1;
    }
    let mut tail = Vec::new();
    while tail.len() < 20_000 {
        tail.extend(shallow(i));
        i += 1;
    }
    tail.extend(pkt(format!("{Z40} {} refs/heads/main\0report-status", "1".repeat(40)).as_bytes()));
    tail.extend_from_slice(b"0000PACK");
    let mut body = chunk(&list);
    for b in &tail {
        body.extend(chunk(std::slice::from_ref(b)));
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let mut s = TcpStream::connect(w.sluice).await.unwrap();
    s.write_all(w.push_head(&w.good(), "").as_bytes()).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&body).await;
        wr
    });
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while complete(&out).is_none() {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let _ = writer.await;
    assert!(read.is_ok(), "no answer within 30s for {} tiny chunks", tail.len());
    eprintln!("{} one-byte chunks after 900 KiB: answered in {:?}", tail.len(), started.elapsed());
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    assert_eq!(
        String::from_utf8_lossy(&decode_body(&head, &out[end + 4..])),
        "000eunpack ok\n003dng refs/heads/main push restricted to refs/heads/feature\n0000"
    );
    w.assert_nothing_went_upstream();
}

// ---------- framing headers spelled with `_` ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_headers_spelled_with_underscores_are_refused() {
    let w = World::new("underscore", Duration::from_secs(10)).await;
    let cases = [
        (
            "GET",
            "info/refs?service=git-upload-pack",
            "Transfer_Encoding: chunked",
            "Transfer_Encoding",
            "Transfer-Encoding",
        ),
        ("POST", "git-receive-pack", "Content_Length: 4", "Content_Length", "Content-Length"),
        ("POST", "git-upload-pack", "content_encoding: gzip", "content_encoding", "Content-Encoding"),
    ];
    for (method, rest, header, name, canonical) in cases {
        let req = format!(
            "{method} /{}.git/{rest} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {}\r\n{header}\r\n\
             Content-Length: 4\r\nConnection: close\r\n\r\n0000",
            w.repo(),
            w.good()
        );
        let mut s = TcpStream::connect(w.sluice).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, head, body) = read_response(&mut s, Duration::from_secs(10)).await;
        assert_eq!(
            (status, String::from_utf8_lossy(&body).as_ref()),
            (
                400,
                format!(
                    "sluice: request header {:?} is {canonical} spelled with '_', which some servers read as a \
                     second {canonical}; send {canonical} only\n",
                    name.to_ascii_lowercase()
                )
                .as_str()
            ),
            "{head}"
        );
    }
    // The same on /api, as GitHub-shaped JSON.
    let req = format!(
        "GET /api/repos/{}/pulls HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {}\r\nTransfer_Encoding: chunked\r\n\
         Connection: close\r\n\r\n",
        w.repo(),
        w.good()
    );
    let mut s = TcpStream::connect(w.sluice).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, _, body) = read_response(&mut s, Duration::from_secs(10)).await;
    let message = "sluice: request header \"transfer_encoding\" is Transfer-Encoding spelled with '_', which some \
                   servers read as a second Transfer-Encoding; send Transfer-Encoding only";
    assert_eq!(
        (status, serde_json::from_slice::<serde_json::Value>(&body).unwrap()),
        (400, serde_json::json!({"message": message, "documentation_url": "https://docs.github.com/rest/pulls/pulls"}))
    );
    w.assert_nothing_went_upstream();
}
