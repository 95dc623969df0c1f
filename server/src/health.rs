//! The operator's HTTP endpoint (`capsync serve --metrics-listen ADDR`, loopback unless told
//! otherwise): `/metrics` in the Prometheus text format, `/healthz` (the process answers) and
//! `/readyz` (the store answers a write-path probe; not ready once shutdown has begun).
//!
//! It runs on the RPC thread's `LocalSet` like the rest of the server, so `/readyz` can ask the
//! store itself; its work per request is small and never blocks (the probe is a future).

use crate::metrics::Metrics;
use crate::store::Store;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

/// How long `/readyz` waits for the store's probe before answering "not ready".
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A request's headers must arrive within this (a slow client cannot hold a connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// What `/readyz` looks at.
pub struct Readiness {
    pub store: Rc<dyn Store>,
    pub closing: watch::Receiver<bool>,
    /// Whether this node's epoch cells are current (several nodes: see `fanout`).
    pub currency: Arc<crate::registry::Currency>,
}

/// Serves the endpoint for as long as the server's `LocalSet` runs: through shutdown, when
/// `/readyz` answers 503.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, readiness: Rc<Readiness>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                warn!(error = %err, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("metrics endpoint: too many connections; closing one");
            continue;
        };
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        tokio::task::spawn_local(async move {
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let (metrics, readiness) = (metrics.clone(), readiness.clone());
                async move { Ok::<_, Infallible>(respond(request.uri().path(), &metrics, &readiness).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(err) = connection.await {
                debug!(error = %err, "metrics endpoint: connection ended");
            }
            drop(permit);
        });
    }
}

async fn respond(path: &str, metrics: &Metrics, readiness: &Readiness) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode()),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match ready(readiness).await {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n")),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: /metrics, /healthz, /readyz\n".into()),
    }
}

async fn ready(readiness: &Readiness) -> Result<(), String> {
    if *readiness.closing.borrow() {
        return Err("shutting down".into());
    }
    if !readiness.currency.holds() {
        return Err("catching up with other nodes' revocations".into());
    }
    match tokio::time::timeout(PROBE_TIMEOUT, readiness.store.probe()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("the store failed a write probe: {err}")),
        Err(_) => Err(format!("the store did not answer a write probe within {PROBE_TIMEOUT:?}")),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}
