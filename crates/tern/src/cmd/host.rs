//! `tern host list|show` (the agent daemon itself is `tern host agent`, wired in main).

use tern_api::center::Host;
use tern_api::ApiClient;

use super::cluster::join_or_dash;
use super::connect::seg;
use super::output::{ago, opt, print_json, Format, Sheet, Table};
use crate::error::{ApiResultExt, CliError};

pub async fn list(api: &ApiClient, fmt: Format) -> Result<(), CliError> {
    let hosts: Vec<Host> = api.get("/api/v1/hosts").await.or_list("tern host list")?;
    if fmt == Format::Json {
        return print_json(&hosts);
    }
    let mut t = Table::new(&[
        "NAME",
        "CLUSTER",
        "STATE",
        "ACCEL",
        "CORES",
        "CPU%",
        "MEM_USED_MIB",
        "MEM_MIB",
        "VMS",
        "HEARTBEAT",
    ]);
    for h in &hosts {
        let (cpu, used) = match &h.load {
            Some(l) => (
                format!("{:.0}", l.cpu_percent),
                l.memory_used_mib.to_string(),
            ),
            None => ("-".into(), "-".into()),
        };
        t.row(vec![
            h.name.clone(),
            h.cluster.clone(),
            h.state.to_string(),
            h.facts.accelerator.to_string(),
            h.facts.cores.to_string(),
            cpu,
            used,
            h.facts.memory_mib.to_string(),
            h.vms.len().to_string(),
            h.last_heartbeat
                .as_ref()
                .map(ago)
                .unwrap_or_else(|| "never".into()),
        ]);
    }
    t.print();
    Ok(())
}

pub async fn show(api: &ApiClient, name: &str, fmt: Format) -> Result<(), CliError> {
    let h: Host = api
        .get(&format!("/api/v1/hosts/{}", seg(name)?))
        .await
        .or_list("tern host list")?;
    if fmt == Format::Json {
        return print_json(&h);
    }
    let f = &h.facts;
    let mut s = Sheet::new();
    s.add("name", &h.name)
        .add("id", h.id)
        .add("cluster", &h.cluster)
        .add("state", h.state)
        .add("agent_url", &h.agent_url)
        .add("hostname", &f.hostname)
        .add(
            "cpu",
            format!("{} cores, {} MHz, {}", f.cores, f.cpu_mhz, f.cpu_model_name),
        )
        .add("cpu_ceiling", opt(&f.cpu_ceiling));
    super::evc::host_cpu_lines(&h, &mut s);
    s.add("memory_mib", f.memory_mib)
        .add("accelerator", f.accelerator)
        .add("qemu", &f.qemu_version)
        .add("agent_version", &f.agent_version)
        .add("migration_address", &f.migration_address)
        .add("shared_storage", &f.shared_storage);
    if let Some(l) = &h.load {
        s.add("cpu_percent", format!("{:.1}", l.cpu_percent)).add(
            "memory_used_mib",
            format!("{} of {}", l.memory_used_mib, l.memory_total_mib),
        );
    }
    s.add(
        "last_heartbeat",
        h.last_heartbeat
            .as_ref()
            .map(ago)
            .unwrap_or_else(|| "never".into()),
    )
    .add("vms", join_or_dash(&h.vms));
    s.print();
    Ok(())
}
