//! The REST API (`/api/v1`), JSON in and out. The CLI's `lifeboat status`
//! reads it.
//!
//! * `GET  /api/v1/status`                — server and per-volume health
//! * `GET  /api/v1/items`                 — items, their volumes, last point
//! * `GET  /api/v1/points[?item=NAME]`    — recovery points cut by this server
//! * `POST /api/v1/items/{item}/points[?kind=app-consistent]` — cut a point now
//! * `GET  /api/v1/agents`                — enrolled agents
//!
//! Calls that change state (POST) need `Authorization: Bearer TOKEN`, the
//! token in the server directory's `api.token` (mode 0600); reads are open
//! to whoever reaches the API address (loopback by default), or need the
//! token too with `api_reads = "token"` in `server.toml`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lifeboat_format::proto::VolumeState;
use serde::{Deserialize, Serialize};

use crate::db::PointRow;
use crate::State;

pub fn router(st: Arc<State>) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/items", get(items))
        .route("/api/v1/points", get(points))
        .route("/api/v1/items/{item}/points", post(cut_point))
        .route("/api/v1/agents", get(agents))
        .layer(axum::middleware::from_fn_with_state(st.clone(), authorize))
        .with_state(st)
}

/// Calls that change state need the API token (and reads too, with
/// `api_reads = "token"`).
async fn authorize(
    AxState(st): AxState<Arc<State>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let read = req.method() == axum::http::Method::GET || req.method() == axum::http::Method::HEAD;
    if read && st.cfg.api_reads != "token" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if blake3::hash(t.trim().as_bytes()) == st.api_token => next.run(req).await,
        _ => ApiError(
            StatusCode::UNAUTHORIZED,
            format!(
                "{} needs the API token: send `Authorization: Bearer` with the token in \
                 {}/api.token (the CLI reads it from --api-token-file or LIFEBOAT_API_TOKEN)",
                if read {
                    "this server's API (api_reads = \"token\")"
                } else {
                    "this call changes state and"
                },
                st.dir.display()
            ),
        )
        .into_response(),
    }
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

/// Health of one replicated volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub item: String,
    pub volume: String,
    pub agent: String,
    pub size: u64,
    /// initial-sync, protected, resyncing, paused, error, disconnected
    pub state: String,
    pub connected: bool,
    /// Age of the oldest write not yet safe here (agent's figure; while
    /// disconnected: time since last contact).
    pub rpo_ms: Option<u64>,
    pub lag_bytes: u64,
    pub journal_bytes: u64,
    /// Bytes the workload changed since the agent started (agent's figure).
    pub written_bytes: u64,
    /// A resync pass or initial sync running: data bytes covered, compared
    /// so far, and the agent's estimate of the time left.
    pub sync_total_bytes: u64,
    pub sync_done_bytes: u64,
    pub sync_eta_secs: Option<u64>,
    pub throughput_bytes_per_sec: u64,
    pub applied_seq: u64,
    pub consistent: bool,
    pub bytes_received: u64,
    pub resync_chunks_compared: u64,
    pub resync_chunks_received: u64,
    pub resync_bytes_received: u64,
    pub last_point: Option<String>,
    pub last_point_time: Option<i64>,
    pub error: Option<String>,
    pub replica: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub site: String,
    pub version: String,
    pub uptime_secs: u64,
    pub vault: Option<String>,
    pub volumes: Vec<VolumeStatus>,
}

fn state_name(s: VolumeState) -> &'static str {
    match s {
        VolumeState::InitialSync => "initial-sync",
        VolumeState::Protected => "protected",
        VolumeState::Resyncing => "resyncing",
        VolumeState::Paused => "paused",
        VolumeState::Error => "error",
    }
}

pub fn status_of(st: &State) -> anyhow::Result<Status> {
    let rows = st.db.volumes()?;
    let pts = st.db.points(None)?;
    let mut last: BTreeMap<String, &PointRow> = BTreeMap::new();
    for p in &pts {
        last.insert(p.item.clone(), p);
    }
    let vols = st.volumes.lock().unwrap();
    let mut out = Vec::new();
    for r in rows {
        let live = vols.get(&(r.item.clone(), r.volume.clone()));
        // try_lock: a point cut holds the replica while it scans
        let (applied, consistent) = match live.and_then(|l| l.replica.try_lock().ok()) {
            Some(g) => (g.applied_seq, g.consistent),
            None => (
                r.applied_seq,
                st.db
                    .stream_state(&r.item, &r.volume)
                    .is_ok_and(|s| s.is_consistent()),
            ),
        };
        let connected = live.is_some_and(|l| l.connected);
        let report = live.and_then(|l| l.report.clone());
        let state = match (&report, connected) {
            (Some(rep), true) => state_name(rep.state).to_string(),
            (None, true) => "connecting".to_string(),
            _ => "disconnected".to_string(),
        };
        let rpo_ms = match (connected, &report, live.and_then(|l| l.last_contact)) {
            (true, Some(rep), _) => Some(rep.rpo_ms),
            (false, _, Some(t)) => Some(t.elapsed().as_millis() as u64),
            _ => None,
        };
        let lp = last.get(&r.item);
        out.push(VolumeStatus {
            item: r.item.clone(),
            volume: r.volume.clone(),
            agent: r.agent.clone(),
            size: r.size,
            state,
            connected,
            rpo_ms,
            lag_bytes: report.as_ref().map(|r| r.lag_bytes).unwrap_or(0),
            journal_bytes: report.as_ref().map(|r| r.journal_bytes).unwrap_or(0),
            written_bytes: report.as_ref().map(|r| r.written_bytes).unwrap_or(0),
            sync_total_bytes: report.as_ref().map(|r| r.pass_total_bytes).unwrap_or(0),
            sync_done_bytes: report.as_ref().map(|r| r.pass_done_bytes).unwrap_or(0),
            sync_eta_secs: report
                .as_ref()
                .filter(|r| r.pass_total_bytes > 0)
                .map(|r| r.pass_eta_ms.div_ceil(1000)),
            throughput_bytes_per_sec: live.map(|l| l.throughput as u64).unwrap_or(0),
            applied_seq: applied,
            consistent,
            bytes_received: live.map(|l| l.bytes_received).unwrap_or(0),
            resync_chunks_compared: live.map(|l| l.resync_chunks_compared).unwrap_or(0),
            resync_chunks_received: live.map(|l| l.resync_chunks_received).unwrap_or(0),
            resync_bytes_received: live.map(|l| l.resync_bytes_received).unwrap_or(0),
            last_point: lp.map(|p| p.id.clone()),
            last_point_time: lp.map(|p| p.time),
            error: live.and_then(|l| l.error.clone()),
            replica: r.replica.clone(),
        });
    }
    Ok(Status {
        site: st.cfg.site.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_secs: st.started.elapsed().as_secs(),
        vault: st.cfg.vault.clone(),
        volumes: out,
    })
}

async fn status(AxState(st): AxState<Arc<State>>) -> Result<Json<Status>, ApiError> {
    Ok(Json(status_of(&st)?))
}

#[derive(Serialize)]
struct Item {
    name: String,
    volumes: Vec<VolumeStatus>,
    last_point: Option<String>,
}

async fn items(AxState(st): AxState<Arc<State>>) -> Result<Json<Vec<Item>>, ApiError> {
    let s = status_of(&st)?;
    let mut m: BTreeMap<String, Item> = BTreeMap::new();
    for v in s.volumes {
        let e = m.entry(v.item.clone()).or_insert_with(|| Item {
            name: v.item.clone(),
            volumes: vec![],
            last_point: v.last_point.clone(),
        });
        e.volumes.push(v);
    }
    Ok(Json(m.into_values().collect()))
}

#[derive(Deserialize)]
struct PointsQuery {
    item: Option<String>,
}

async fn points(
    AxState(st): AxState<Arc<State>>,
    Query(q): Query<PointsQuery>,
) -> Result<Json<Vec<PointRow>>, ApiError> {
    Ok(Json(st.db.points(q.item.as_deref())?))
}

#[derive(Deserialize)]
struct CutQuery {
    /// `app-consistent` runs the item's freeze/thaw hooks on the agent.
    kind: Option<String>,
}

async fn cut_point(
    AxState(st): AxState<Arc<State>>,
    Path(item): Path<String>,
    Query(q): Query<CutQuery>,
) -> Result<Json<crate::points::Cut>, ApiError> {
    let app = match q.kind.as_deref() {
        None | Some("crash-consistent") => false,
        Some("app-consistent") => true,
        Some(k) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("kind {k:?}: use crash-consistent or app-consistent"),
            ))
        }
    };
    match crate::points::cut(&st, &item, true, Some("on-request"), app).await {
        Ok(Some(c)) => Ok(Json(c)),
        Ok(None) => Err(ApiError(StatusCode::CONFLICT, "no point was cut".into())),
        Err(e) => Err(ApiError(StatusCode::CONFLICT, format!("{e:#}"))),
    }
}

async fn agents(
    AxState(st): AxState<Arc<State>>,
) -> Result<Json<Vec<crate::db::AgentRow>>, ApiError> {
    Ok(Json(st.db.agents()?))
}
