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
        ensure_tap(&tap, "br0")?;
        ensure_tap(&tap, "br0")?;
        match ensure_tap(&tap, "nobr0") {
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
    // The root namespace has no such device.
    assert!(tern_testkit::netns::ip(&["link", "show", "dev", &tap]).is_err());

    ns.run_in(|| {
        remove_tap(&tap).expect("remove");
        remove_tap(&tap).expect("remove again");
    });
    assert!(!ns.has_link(&tap), "tap removed");
}
