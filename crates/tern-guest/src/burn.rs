//! The CPU burner: keeps a share of the guest's CPUs busy (for load and scheduling tests).

use std::time::{Duration, Instant};

const PERIOD: Duration = Duration::from_millis(20);

/// Starts one thread per CPU, each busy for `percent` of every 20 ms period, so the guest as a
/// whole uses `percent` of all its CPUs.
pub fn start(percent: u32) -> std::io::Result<()> {
    let percent = percent.min(100);
    if percent == 0 {
        return Ok(());
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy = PERIOD * percent / 100;
    for i in 0..cpus {
        std::thread::Builder::new()
            .name(format!("burn{i}"))
            .spawn(move || burn(busy))?;
    }
    Ok(())
}

fn burn(busy: Duration) -> ! {
    let mut x: u64 = 1;
    loop {
        let start = Instant::now();
        while start.elapsed() < busy {
            for _ in 0..1000 {
                x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
            }
        }
        if let Some(rest) = (start + PERIOD).checked_duration_since(Instant::now()) {
            std::thread::sleep(rest);
        }
    }
}
