//! Values many tests need the same way.

use tern_api::{Accelerator, HostFacts};

/// A fake host's facts: `cores` and `memory_mib`, QEMU 10 under TCG, no CPU capability
/// probed (tests that need one add it).
pub fn host_facts(cores: u32, memory_mib: u64) -> HostFacts {
    HostFacts {
        resource_control: None,
        uefi: false,
        hostname: "fake".into(),
        cores,
        memory_mib,
        cpu_mhz: 2000,
        cpu_model_name: "Fake CPU".into(),
        cpu_flags: vec!["sse2".into()],
        qemu_version: "10.0.0".into(),
        accelerator: Accelerator::Tcg,
        migration_address: "127.0.0.1".into(),
        shared_storage: "/shared".into(),
        cpu_capability: vec![],
        cpu_ceiling: None,
        cpu: None,
        agent_version: "test".into(),
        migration_tls: true,
        migration_relay: true,
        relay_source_checked: true,
    }
}
