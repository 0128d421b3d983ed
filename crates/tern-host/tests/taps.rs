//! Tap devices in a real network namespace: created, attached to the bridge, up, idempotent,
//! removed.

mod common;

use tern_host::tap::{ensure_tap, remove_tap, tap_name, TapError};
use tern_testkit::NetNs;

#[test]
fn tap_lifecycle_in_a_namespace() {
    let ns = NetNs::new("th-taps").with_bridge("br0");
    let tap = tap_name(uuid::Uuid::new_v4(), 0);
    // Second call: an agent restarted on its own tap must succeed and change nothing.
    let result: Result<(), TapError> = ns.run_in(|| {
        ensure_tap(&tap, "br0", None)?;
        ensure_tap(&tap, "br0", None)?;
        // Given to a VM's QEMU user: only that user may attach to it.
        ensure_tap(&tap, "br0", Some((400_000_007, 400_000_008)))?;
        match ensure_tap(&tap, "nobr0", None) {
            Err(TapError::NoBridge(_)) => Ok(()),
            other => panic!("missing bridge not reported: {other:?}"),
        }
    });
    result.expect("taps");

    assert!(ns.has_link(&tap), "tap created in the namespace");
    assert_eq!(ns.master_of(&tap).as_deref(), Some("br0"));
    let show = ns
        .ip(&["-o", "link", "show", "dev", &tap])
        .expect("show tap");
    assert!(show.contains("UP"), "tap is up: {show}");
    assert!(
        show.contains(&format!("qlen {}", tern_host::tap::TAP_QUEUE_LEN)),
        "tap queue holds a pause's worth of frames: {show}"
    );
    let details = ns
        .ip(&["-d", "-o", "link", "show", "dev", &tap])
        .expect("show tap details");
    assert!(
        details.contains("user 400000007 group 400000008"),
        "tap owned by the VM's QEMU user: {details}"
    );
    // The root namespace has no such device.
    assert!(tern_testkit::netns::ip(&["link", "show", "dev", &tap]).is_err());

    ns.run_in(|| {
        remove_tap(&tap).expect("remove");
        remove_tap(&tap).expect("remove again");
    });
    assert!(!ns.has_link(&tap), "tap removed");
}
