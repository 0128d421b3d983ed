//! EVC in the CLI: `tern cluster set-evc|evc-modes`, `tern vm can-migrate`, and the CPU lines
//! of `tern vm show` and `tern host show`.

use tern_api::center::{Host, Vm};
use tern_api::evc::{EvcModeChange, EvcModes, MigrationCheckReport, SetEvcMode, VmCpuSource};
use tern_api::CenterClient;

use super::cluster::join_or_dash;
use super::output::{opt, print_json, Format, Sheet, Table};
use crate::error::{ApiResultExt, CliError, ExitKind};

/// `tern cluster set-evc NAME MODE` (`none` clears the mode).
pub async fn set_evc(
    api: &CenterClient,
    cluster: &str,
    mode: &str,
    fmt: Format,
) -> Result<(), CliError> {
    let mode = mode.trim();
    let body = SetEvcMode {
        mode: (!mode.is_empty() && !mode.eq_ignore_ascii_case("none")).then(|| mode.to_string()),
    };
    let ch: EvcModeChange = api
        .set_evc(cluster, &body)
        .await
        .or_list("tern cluster list")?;
    if fmt == Format::Json {
        return print_json(&ch);
    }
    println!(
        "cluster {}: EVC mode {} → {} ({})",
        ch.cluster,
        ch.from.as_deref().unwrap_or("none"),
        ch.to.as_deref().unwrap_or("none"),
        serde_json::to_value(ch.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    );
    println!("note: {}", ch.note);
    Ok(())
}

/// `tern cluster evc-modes NAME`.
pub async fn evc_modes(api: &CenterClient, cluster: &str, fmt: Format) -> Result<(), CliError> {
    let m: EvcModes = api.evc_modes(cluster).await.or_list("tern cluster list")?;
    if fmt == Format::Json {
        return print_json(&m);
    }
    let mut s = Sheet::new();
    s.add("cluster", &m.cluster)
        .add("current", opt(&m.current))
        .add("best", opt(&m.best))
        .add("modes", join_or_dash(&m.modes));
    if !m.unknown_hosts.is_empty() {
        s.add("no_cpu_report", m.unknown_hosts.join(", "));
    }
    s.print();
    println!();
    let mut t = Table::new(&["HOST", "CEILING", "BEST", "SUPPORTED"]);
    for h in &m.hosts {
        t.row(vec![
            h.host.clone(),
            opt(&h.ceiling),
            opt(&h.best),
            join_or_dash(&h.supported),
        ]);
    }
    t.print();
    Ok(())
}

/// `tern vm can-migrate NAME --to HOST`: every pre-check on its own line; exit 4 if any fails.
pub async fn can_migrate(
    api: &CenterClient,
    vm: &str,
    to: &str,
    fmt: Format,
) -> Result<(), CliError> {
    let r: MigrationCheckReport = api.can_migrate(vm, to).await.or_list("tern vm list")?;
    if fmt == Format::Json {
        print_json(&r)?;
    } else {
        println!(
            "VM {} from {} to {}:",
            r.vm,
            r.from.as_deref().unwrap_or("-"),
            r.to
        );
        let width = r
            .checks
            .iter()
            .map(|c| c.check.name().len())
            .max()
            .unwrap_or(0);
        for c in &r.checks {
            let mark = if c.ok { "✓" } else { "✗" };
            println!("{mark} {:<width$}  {}", c.check, c.detail);
        }
    }
    if r.ok {
        if fmt == Format::Table {
            println!("VM {} can migrate to {}", r.vm, r.to);
        }
        Ok(())
    } else {
        let failed: Vec<&str> = r
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.check.name())
            .collect();
        Err(CliError::new(
            ExitKind::Refused,
            format!(
                "VM {} cannot migrate to {}: {} check(s) failed ({})",
                r.vm,
                r.to,
                failed.len(),
                failed.join(", ")
            ),
        ))
    }
}

/// The CPU lines of `tern vm show`.
pub fn vm_cpu_lines(vm: &Vm, s: &mut Sheet) {
    let Some(cpu) = &vm.cpu else {
        s.add("cpu", "- (not resolved yet)");
        return;
    };
    let source = match cpu.source {
        VmCpuSource::ClusterMode => "the cluster's EVC mode",
        VmCpuSource::Default => "default baseline",
        VmCpuSource::Named => "named by the VM",
        VmCpuSource::HostPassthrough => "host passthrough",
    };
    let when = if cpu.powered_on {
        "powered on with it"
    } else {
        "resolved at creation"
    };
    s.add(
        "cpu",
        format!(
            "{} ({source}; {} features; {when} on {})",
            cpu.model,
            cpu.features.len(),
            cpu.host
        ),
    )
    .add("cpu_qemu", &cpu.qemu_cpu);
    if cpu.source == VmCpuSource::HostPassthrough {
        s.add(
            "cpu_migratable",
            "only to a host with an identical CPU (host passthrough)",
        );
    }
}

/// The CPU lines of `tern host show`.
pub fn host_cpu_lines(h: &Host, s: &mut Sheet) {
    let f = &h.facts;
    match &f.cpu {
        Some(cpu) => {
            s.add(
                "cpu_guest",
                format!(
                    "{} family {} model {} stepping {} ({}), {} features offered",
                    cpu.vendor.as_deref().unwrap_or("-"),
                    cpu.family,
                    cpu.model,
                    cpu.stepping,
                    cpu.model_id,
                    f.cpu_capability.len()
                ),
            )
            .add("cpu_best_baseline", opt(&cpu.best_baseline))
            .add("cpu_baselines", join_or_dash(&cpu.supported_baselines));
        }
        None => {
            s.add("cpu_baselines", "- (the agent could not probe QEMU)");
        }
    }
}
