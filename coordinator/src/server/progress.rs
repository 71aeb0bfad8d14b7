//! A progress bar over the bytes workers load while an epoch is installed:
//! reads each worker's `Stats.loading_bytes` every [`DRAW_EVERY`] and draws
//! on stderr (only when stderr is a terminal; the per-worker log lines are
//! printed either way). It asks on a timer because a worker tells its
//! progress only when asked (`InstallPlan` answers once, at the end); the
//! supervisor tells it to stop.
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::oneshot;

use super::state::WorkerEntry;

/// How often the bar asks the workers and redraws.
const DRAW_EVERY: Duration = Duration::from_millis(200);

/// Draws until `stop` fires (or is dropped), then clears the bar.
pub(super) async fn follow(
    workers: Vec<WorkerEntry>,
    total: u64,
    epoch: u64,
    mut stop: oneshot::Receiver<()>,
) {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{msg} [{bar:32}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar.set_message(format!("epoch {epoch}: loading on {} workers", workers.len()));
    let mut draw = tokio::time::interval(DRAW_EVERY);
    draw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    draw.tick().await;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = draw.tick() => {}
        }
        let polls = workers.iter().map(|w| {
            let c = w.client.clone();
            async move { c.progress(Duration::from_millis(500)).await.map_or(0, |(_, loading)| loading) }
        });
        let loaded: u64 = futures::future::join_all(polls).await.into_iter().sum();
        bar.set_position(loaded.min(total));
    }
    bar.finish_and_clear();
}
