//! Keeping the real token out of what the upstream says: every form of it (the raw value, and base64 of it
//! and of `x-access-token:TOKEN`, standard and URL-safe, padded or not) is replaced, in whole texts, in
//! texts cut to a length (a fragment left at the cut counts as the token), and in streamed bodies.

use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::credential::Secret;

/// What a form of the token becomes.
pub const REDACTED: &[u8] = b"[redacted]";
/// A fragment of a form at least this long, left at the end of a cut text, is redacted too. Shorter ones
/// are public: every form of a GitHub token begins with at least this many fixed characters (`ghs_`,
/// `Z2hz`, `eC1hY2Nlc3Mt…` for `x-access-token:`).
pub const MIN_FRAGMENT: usize = 4;

/// The forms of one token, longest first, so a base64 form is never half-replaced by a shorter one.
#[derive(Clone, Debug, Default)]
pub struct Scrubber {
    forms: Vec<Vec<u8>>,
    /// Whether a byte begins some form: most positions are passed over with one lookup.
    starts: Vec<bool>,
}

impl Scrubber {
    /// `None` (no token configured) scrubs nothing.
    pub fn new(token: Option<&Secret<String>>) -> Scrubber {
        let Some(raw) = token.map(|t| t.expose().as_str()).filter(|t| !t.is_empty()) else {
            return Scrubber::default();
        };
        let mut forms = vec![raw.to_owned()];
        for plain in [raw.to_owned(), format!("x-access-token:{raw}")] {
            forms.push(STANDARD.encode(&plain));
            forms.push(URL_SAFE.encode(&plain));
            forms.push(URL_SAFE_NO_PAD.encode(&plain));
            forms.push(STANDARD.encode(&plain).trim_end_matches('=').to_owned());
        }
        forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        forms.dedup();
        let mut starts = vec![false; 256];
        for f in &forms {
            starts[usize::from(f.as_bytes()[0])] = true;
        }
        Scrubber { forms: forms.into_iter().map(String::into_bytes).collect(), starts }
    }

    /// The longest form: a streamed body holds back one byte less than this.
    pub fn longest(&self) -> usize {
        self.forms.first().map_or(0, Vec::len)
    }

    /// The form that begins at `buf[0]`, if one does (checked whole: `buf` must hold it).
    fn form_at(&self, buf: &[u8]) -> Option<usize> {
        let first = *buf.first()?;
        if !self.starts[usize::from(first)] {
            return None;
        }
        self.forms.iter().find(|f| buf.starts_with(f)).map(Vec::len)
    }

    /// Replaces every form that begins before `until`, appending to `out`; returns where it stopped
    /// (`until`, or past it when a form straddled it).
    fn replace(&self, buf: &[u8], until: usize, out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        let mut plain = 0;
        while i < until {
            match self.form_at(&buf[i..]) {
                Some(len) => {
                    out.extend_from_slice(&buf[plain..i]);
                    out.extend_from_slice(REDACTED);
                    i += len;
                    plain = i;
                }
                None => i += 1,
            }
        }
        out.extend_from_slice(&buf[plain..i.min(buf.len())]);
        i
    }

    /// `buf` with every form of the token replaced.
    pub fn bytes(&self, buf: &[u8]) -> Vec<u8> {
        if self.forms.is_empty() {
            return buf.to_vec();
        }
        let mut out = Vec::with_capacity(buf.len());
        self.replace(buf, buf.len(), &mut out);
        out
    }

    pub fn text(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.bytes(text.as_bytes())).into_owned()
    }

    /// The length of the longest end of `buf` that is the beginning of a form (not a whole one).
    fn fragment_at_end(&self, buf: &[u8]) -> usize {
        let mut longest = 0;
        for form in &self.forms {
            for len in (longest + 1..form.len().min(buf.len() + 1)).rev() {
                if buf.ends_with(&form[..len]) {
                    longest = len;
                    break;
                }
            }
        }
        longest
    }

    /// At most about `limit` bytes of `buf`, scrubbed before it is cut; a fragment of a form left at the
    /// end (by the cut, or because whoever read `buf` stopped inside a form) is redacted as well. Read
    /// `limit + longest()` bytes when you can, so that a form straddling the limit is whole here.
    pub fn cut(&self, buf: &[u8], limit: usize) -> Vec<u8> {
        let mut out = self.bytes(buf);
        out.truncate(limit);
        let fragment = self.fragment_at_end(&out);
        if fragment >= MIN_FRAGMENT {
            out.truncate(out.len() - fragment);
            out.extend_from_slice(REDACTED);
        }
        out
    }
}

/// A response body with every form of the token replaced as it streams. Memory: one held-back tail
/// shorter than the longest form; work: one table lookup per byte, plus a comparison where a form's
/// first byte appears.
pub struct ScrubbedBody<B> {
    inner: B,
    scrubber: Scrubber,
    held: Vec<u8>,
    /// A trailers frame that arrived while bytes were held back: sent after them.
    pending: Option<Frame<Bytes>>,
    done: bool,
}

impl<B> ScrubbedBody<B> {
    pub fn new(inner: B, scrubber: Scrubber) -> ScrubbedBody<B> {
        ScrubbedBody { inner, scrubber, held: Vec::new(), pending: None, done: false }
    }

    /// Adds `data` and returns what can be sent: everything but a tail that may begin a form.
    fn feed(&mut self, data: &[u8]) -> Bytes {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(data);
        let keep = self.scrubber.longest().saturating_sub(1);
        let until = buf.len().saturating_sub(keep);
        let mut out = Vec::with_capacity(buf.len());
        let stopped = self.scrubber.replace(&buf, until, &mut out);
        self.held = buf.get(stopped..).map(<[u8]>::to_vec).unwrap_or_default();
        Bytes::from(out)
    }

    /// The body ended: the held-back tail, scrubbed.
    fn flush(&mut self) -> Bytes {
        let held = std::mem::take(&mut self.held);
        Bytes::from(self.scrubber.bytes(&held))
    }
}

impl<B> Body for ScrubbedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(frame) = self.pending.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = self.feed(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => {
                        let out = self.flush();
                        if out.is_empty() {
                            return Poll::Ready(Some(Ok(trailers)));
                        }
                        self.pending = Some(trailers);
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                },
                Poll::Ready(None) => {
                    self.done = true;
                    let out = self.flush();
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Frame::data(out))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && (self.done || (self.held.is_empty() && self.inner.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        // Replacing changes the length: only "no more than" would be a promise, and not even that (a
        // token shorter than the marker grows).
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const TOKEN: &str = "ghs_S3cr3t/+=Token0123456789";

    fn scrubber() -> Scrubber {
        Scrubber::new(Some(&Secret::new(TOKEN.to_owned())))
    }

    fn forms() -> Vec<String> {
        scrubber().forms.iter().map(|f| String::from_utf8(f.clone()).unwrap()).collect()
    }

    /// No piece of any form `len` bytes long (so no longer one either) in the end of `text`, where a cut
    /// would leave it.
    fn assert_no_fragment(text: &[u8], len: usize) {
        let tail = &text[text.len().saturating_sub(200)..];
        for form in forms() {
            for piece in form.as_bytes().windows(len) {
                assert!(
                    !tail.windows(len).any(|w| w == piece),
                    "{:?} of {form:?} is in {:?}",
                    String::from_utf8_lossy(piece),
                    String::from_utf8_lossy(tail)
                );
            }
        }
    }

    #[test]
    fn every_form_is_replaced() {
        let s = scrubber();
        let b64 = STANDARD.encode(format!("x-access-token:{TOKEN}"));
        let text = format!("a {TOKEN} b {b64} c {} d{TOKEN}{TOKEN}", URL_SAFE_NO_PAD.encode(TOKEN));
        assert_eq!(s.text(&text), "a [redacted] b [redacted] c [redacted] d[redacted][redacted]");
        assert_eq!(Scrubber::new(None).text(&text), text);
        assert_eq!(s.text("plain"), "plain");
    }

    #[test]
    fn a_form_straddling_the_cut_leaves_no_fragment() {
        let s = scrubber();
        let limit = 1000;
        for form in forms() {
            for start in (limit - form.len() - 2..=limit + 2).step_by(3) {
                let mut body = vec![b'x'; start];
                body.extend_from_slice(form.as_bytes());
                body.extend_from_slice(&[b'y'; 64]);
                // Read as the proxy does: limit + longest, then cut.
                body.truncate(limit + s.longest());
                let out = s.cut(&body, limit);
                assert!(out.len() <= limit + REDACTED.len(), "{} bytes", out.len());
                assert_no_fragment(&out, MIN_FRAGMENT);
                if start < limit {
                    let marker = &REDACTED[..REDACTED.len().min(limit - start)];
                    assert!(out[start..].starts_with(marker), "start {start}: {:?}", String::from_utf8_lossy(&out));
                }
            }
        }
        // A short read that stopped inside a form.
        let body = format!("error: {}", &TOKEN[..12]);
        assert_eq!(String::from_utf8(s.cut(body.as_bytes(), 100)).unwrap(), "error: [redacted]");
        // The public beginning alone, and text that is no fragment, stay.
        assert_eq!(String::from_utf8(s.cut(b"use a ghs", 100)).unwrap(), "use a ghs");
        assert_eq!(String::from_utf8(s.cut(b"0123456789", 4)).unwrap(), "0123");
    }

    /// A body of ready frames.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn a_streamed_body_is_scrubbed_at_every_split() {
        let s = scrubber();
        let b64 = STANDARD.encode(format!("x-access-token:{TOKEN}"));
        let text = format!("{{\"a\":\"{TOKEN}\",\"b\":\"{b64}\",\"c\":\"{}\"}}", &TOKEN[..10]);
        let want = s.bytes(text.as_bytes());
        for cut in 0..=text.len() {
            for second in [cut, (cut + 7).min(text.len())] {
                let t = text.as_bytes();
                let inner = Frames(
                    vec![&t[..cut], &t[cut..second], &t[second..]].into_iter().map(Bytes::copy_from_slice).collect(),
                );
                let got = ScrubbedBody::new(inner, s.clone()).collect().await.unwrap().to_bytes();
                assert_eq!(got, want, "split at {cut} and {second}");
            }
        }
        assert_eq!(
            String::from_utf8(want).unwrap(),
            format!(r#"{{"a":"[redacted]","b":"[redacted]","c":"{}"}}"#, &TOKEN[..10])
        );
    }
}
