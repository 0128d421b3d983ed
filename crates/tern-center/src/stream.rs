//! The live feed behind `GET /api/v1/stream`: one publisher reads the store for new events and
//! for tasks whose state changed, and hands each to every open stream (server-sent events),
//! so a browser learns of a change within half a second without polling the API itself. Tasks
//! seen ending are also counted in the metrics.
//!
//! The store is the source: whatever records an event or a task's progress (any module, any
//! driver) reaches the feed without calling it. A stream that falls too far behind is told to
//! `resync` (reload what it shows) instead of being fed a partial history.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use crate::app::App;
use crate::error::CenterError;

/// How often the store is read for changes.
const PERIOD: Duration = Duration::from_millis(300);
/// Tasks compared each period: the newest, which hold every running one in practice.
const RECENT_TASKS: u32 = 200;
/// Most events sent per period (a burst beyond it reaches streams as `resync`).
const MAX_EVENTS: u32 = 500;

/// Publishes new events (`event`) and changed tasks (`task`) on `app.feed` until shutdown.
pub async fn publisher(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let mut last_event = match app
        .db
        .read(|tx| Ok::<_, CenterError>(tx.last_event_id()?))
        .await
    {
        Ok(id) => id,
        Err(e) => {
            tracing::error!("live feed: {e}");
            0
        }
    };
    let mut tasks: HashMap<Uuid, String> = HashMap::new();
    let mut first = true;
    loop {
        if !crate::app::tick(PERIOD, &mut shutdown).await {
            return;
        }
        let after = last_event;
        let read = app
            .db
            .read(move |tx| {
                Ok::<_, CenterError>((
                    tx.events_after(after, MAX_EVENTS + 1)?,
                    tx.tasks(RECENT_TASKS, None)?,
                ))
            })
            .await;
        let (events, recent) = match read {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("live feed: {e}");
                continue;
            }
        };
        if let Some(e) = events.last() {
            last_event = e.id;
        }
        if events.len() > MAX_EVENTS as usize {
            publish(&app, "resync", "{}".into());
        } else {
            for e in &events {
                if let Ok(json) = serde_json::to_string(e) {
                    publish(&app, "event", json);
                }
            }
        }
        for t in &recent {
            let Ok(json) = serde_json::to_string(t) else {
                continue;
            };
            if tasks.get(&t.id) != Some(&json) {
                let was_done = tasks
                    .get(&t.id)
                    .is_some_and(|old| old.contains("\"finished_at\":\""));
                tasks.insert(t.id, json.clone());
                // The first reading is the starting point, not news.
                if !first {
                    if t.finished_at.is_some() && !was_done {
                        app.metrics.task_finished(t);
                    }
                    publish(&app, "task", json);
                }
            }
        }
        if tasks.len() > 4 * RECENT_TASKS as usize {
            let keep: std::collections::HashSet<Uuid> = recent.iter().map(|t| t.id).collect();
            tasks.retain(|id, _| keep.contains(id));
        }
        first = false;
    }
}

fn publish(app: &App, name: &'static str, json: String) {
    // No receiver (no stream open) is not an error: nobody is watching.
    let _ = app.feed.send((name, Arc::from(json)));
}
