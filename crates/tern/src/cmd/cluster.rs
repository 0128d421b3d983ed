//! `tern cluster create|list|show|set-evc|evc-modes|set-drs|drs|set-migration`.

use tern_api::center::{Cluster, ClusterMigrationSettings, CreateCluster, MigrationEncryption};
use tern_api::drs::{DrsAutomation, DrsSettings};
use tern_api::CenterClient;

use super::output::{opt, print_json, time, Format, Sheet, Table};
use crate::error::{ApiResultExt, CliError};

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Create a cluster.
    Create {
        name: String,
        /// EVC baseline: the CPU model every VM of the cluster sees (e.g. x86-64-v2, Haswell).
        #[arg(long = "evc", value_name = "MODE")]
        evc_mode: Option<String>,
        /// required (default): every migration stream is encrypted and authenticated with a
        /// key made for it; opportunistic: when both hosts' QEMU can; disabled: never.
        #[arg(long, value_name = "MODE", value_parser = parse_encryption)]
        migration_encryption: Option<MigrationEncryption>,
    },
    /// List clusters.
    List,
    /// Show one cluster.
    Show { name: String },
    /// Set the cluster's EVC mode (a CPU baseline every host offers); `none` clears it.
    SetEvc {
        name: String,
        /// Baseline name (see `tern cluster evc-modes NAME`), or `none`.
        mode: String,
    },
    /// The EVC modes every host of the cluster supports, and the best one.
    EvcModes { name: String },
    /// Set the cluster's DRS settings (the ones not given keep their value).
    SetDrs {
        name: String,
        /// manual (recommendations only), partially (placement only), fully (also applies
        /// balance recommendations on the center's DRS period).
        #[arg(long, value_parser = parse_automation)]
        automation: Option<DrsAutomation>,
        /// Migration threshold 1 (mandatory moves only) .. 5 (also small gains).
        #[arg(long)]
        threshold: Option<u8>,
        /// What a degraded host's VMs do (a host whose health counters cross a limit, or
        /// that `tern host degrade` marked): off (signals shown only), recommend (an event
        /// recommends `tern host evacuate`), automatic (emptied live at once). A degraded
        /// host takes no new VMs in every mode.
        #[arg(long, value_name = "off|recommend|automatic")]
        proactive: Option<tern_api::health::ProactiveMode>,
    },
    /// The cluster's DRS settings and the engine's balance recommendations now.
    Drs { name: String },
    /// Set the cluster's migration policy (migrations already running keep theirs).
    SetMigration {
        name: String,
        /// required: every migration stream is encrypted (a host whose QEMU cannot is refused
        /// as a destination); opportunistic: encrypted when both hosts can; disabled: never
        /// (an isolated migration network where the CPU matters more).
        #[arg(long, value_name = "MODE", value_parser = parse_encryption)]
        encryption: MigrationEncryption,
    },
}

fn parse_encryption(s: &str) -> Result<MigrationEncryption, String> {
    s.parse()
}

fn parse_automation(s: &str) -> Result<DrsAutomation, String> {
    DrsAutomation::parse(s).ok_or_else(|| format!("{s:?}: use manual, partially or fully"))
}

pub async fn run(cmd: ClusterCommand, api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    match cmd {
        ClusterCommand::Create {
            name,
            evc_mode,
            migration_encryption,
        } => {
            let body = CreateCluster {
                name,
                evc_mode,
                migration_encryption,
            };
            let c: Cluster = api
                .create_cluster(&body)
                .await
                .or_list("tern cluster list")?;
            match fmt {
                Format::Json => print_json(&c),
                Format::Table => {
                    println!(
                        "created cluster {} (evc: {}, migration encryption: {})",
                        c.name,
                        opt(&c.evc_mode),
                        c.migration_encryption
                    );
                    Ok(())
                }
            }
        }
        ClusterCommand::List => {
            let list: Vec<Cluster> = api.clusters().await.or_list("tern cluster list")?;
            match fmt {
                Format::Json => print_json(&list),
                Format::Table => {
                    let mut t = Table::new(&["NAME", "EVC", "ENCRYPTION", "HOSTS", "CREATED"]);
                    for c in &list {
                        t.row(vec![
                            c.name.clone(),
                            opt(&c.evc_mode),
                            c.migration_encryption.to_string(),
                            c.hosts.len().to_string(),
                            time(&c.created_at),
                        ]);
                    }
                    t.print();
                    Ok(())
                }
            }
        }
        ClusterCommand::SetEvc { name, mode } => super::evc::set_evc(api, &name, &mode, fmt).await,
        ClusterCommand::EvcModes { name } => super::evc::evc_modes(api, &name, fmt).await,
        ClusterCommand::Drs { name } => super::drs::recommend(api, &name, fmt).await,
        ClusterCommand::SetDrs {
            name,
            automation,
            threshold,
            proactive,
        } => {
            let mut s: DrsSettings = api.drs(&name).await.or_list("tern cluster list")?;
            if let Some(a) = automation {
                s.automation = a;
            }
            if let Some(t) = threshold {
                s.threshold = t;
            }
            if let Some(p) = proactive {
                s.proactive = p;
            }
            let s: DrsSettings = api.set_drs(&name, &s).await.or_list("tern cluster list")?;
            match fmt {
                Format::Json => print_json(&s),
                Format::Table => {
                    println!(
                        "cluster {name}: DRS automation {}, threshold {}, proactive {}",
                        s.automation, s.threshold, s.proactive
                    );
                    Ok(())
                }
            }
        }
        ClusterCommand::SetMigration { name, encryption } => {
            let s = ClusterMigrationSettings { encryption };
            let s = api
                .set_cluster_migration(&name, &s)
                .await
                .or_list("tern cluster list")?;
            match fmt {
                Format::Json => print_json(&s),
                Format::Table => {
                    println!("cluster {name}: migration encryption {}", s.encryption);
                    Ok(())
                }
            }
        }
        ClusterCommand::Show { name } => {
            let c: Cluster = api.cluster(&name).await.or_list("tern cluster list")?;
            match fmt {
                Format::Json => print_json(&c),
                Format::Table => {
                    let mut s = Sheet::new();
                    s.add("name", &c.name)
                        .add("id", c.id)
                        .add("evc", opt(&c.evc_mode))
                        .add("migration encryption", c.migration_encryption)
                        .add("hosts", join_or_dash(&c.hosts))
                        .add("created", time(&c.created_at));
                    s.print();
                    Ok(())
                }
            }
        }
    }
}

/// `a, b, c`, or `-` when empty.
pub fn join_or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}
