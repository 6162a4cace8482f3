//! The admin listener: `/metrics` (OpenMetrics text), `/healthz`, and `/v1/denials?session=ID`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::listen::{self, Accepted, Listener, Shutdown};
use crate::metrics::{Denials, Metrics};

/// What the admin endpoints read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub denials: Arc<Denials>,
    /// Reads the log writer's dropped-line count when `/metrics` is scraped.
    pub dropped_lines: Box<dyn Fn() -> u64 + Send + Sync>,
}

/// Most admin connections served at once (scrapers and health checks); more get a `503`.
const MAX_CONNECTIONS: usize = 64;

pub async fn serve(socket: TcpListener, admin: Arc<Admin>, shutdown: Shutdown) {
    let overload = |_| {
        let body = "sluice: the admin listener is at its connection limit; retry shortly\n";
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\ndate: {date}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let listener = Listener { name: "admin", socket, max_connections: MAX_CONNECTIONS, overload };
    listen::serve(listener, shutdown, move |accepted: Accepted| {
        let admin = admin.clone();
        async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, &req)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(accepted.stream), service)
                .await;
        }
    })
    .await;
}

fn route(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/metrics" => {
            admin.metrics.set_dropped_log_lines((admin.dropped_lines)());
            let mut r = text(StatusCode::OK, &admin.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        "/v1/denials" => {
            let session = req.uri().query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("session="));
            let Some(session) = session.filter(|s| !s.is_empty()) else {
                return text(StatusCode::BAD_REQUEST, "missing ?session=ID\n");
            };
            let body = serde_json::json!({ "session": session, "denials": admin.denials.recent(session) });
            let mut r = text(StatusCode::OK, &format!("{body}\n"));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /v1/denials?session=ID\n"),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}
