//! DRS placement rules in the lab, through the CLI (one lab, two hosts, real QEMU guests):
//! - an anti-affinity rule places a VM started on its registered host elsewhere when the
//!   other VM of the rule runs there, refuses a migration that would bring them together
//!   (pre-check `rules`, nothing moves), and keeps a host from being emptied, the maintenance
//!   naming the rule;
//! - a must-run-on rule keeps its VM on its host through maintenance, named the same way;
//! - rules that conflict, name unknown VMs or have the wrong members are refused with the
//!   reason, and a removed rule binds nothing any more;
//! - a should-run-on rule broken because its hosts cannot take the VM is reported by
//!   `drs recommend` with that reason, and with the VM's cooldown once they can.

mod common;

use common::{text, Lab};
use serde_json::Value;

fn host_of(lab: &Lab, vm: &str) -> String {
    let v: Value = lab.tern_json(&["vm", "show", vm]);
    v["host"].as_str().unwrap_or_default().to_string()
}

#[test]
fn rules_hold_through_placement_migration_and_maintenance() {
    let lab = Lab::up("rul", 2);
    let a = lab.create_vm("a", "h1", "10.78.0.140", "52:54:00:7e:04:01", 256, "", &[]);
    // b is registered on h1 too, not started yet.
    let args = lab.vm_create_args("b", "h1", "10.78.0.141", "52:54:00:7e:04:02", 256, "", &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.tern_ok(&args);

    let added = lab.tern_ok(&[
        "rule",
        "add",
        "lab",
        "apart",
        "--kind",
        "anti-affinity",
        "--vms",
        "a,b",
    ]);
    assert!(added.contains("apart: anti_affinity of a, b"), "{added}");

    // Placement: b starts on h2, where a is not.
    lab.tern_ok(&["vm", "start", "b"]);
    assert_eq!(host_of(&lab, "b"), "h2");
    let b: Value = lab.tern_json(&["vm", "show", "b"]);
    let b_id = b["id"].as_str().expect("id").to_string();
    lab.wait_console("b", "TERN-GUEST-READY", std::time::Duration::from_secs(120));
    let events = lab.tern_ok(&["event", "list", "--vm", "b"]);
    assert!(
        events.contains("placed VM b on host h2") && events.contains("apart"),
        "{events}"
    );

    // A migration that would bring them together is refused before anything moves.
    let o = lab.tern(&["vm", "migrate", "b", "--to", "h1"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("rule apart"), "{}", text(&o));
    lab.one_copy_on("b", &b_id, "h2");

    // Maintenance of h2 cannot move b next to a: the host stays in maintenance with b on
    // it, and the failure names the rule.
    let o = lab.tern(&["host", "maintenance", "enter", "h2"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("apart"), "{}", text(&o));
    lab.one_copy_on("b", &b_id, "h2");
    lab.tern_ok(&["host", "maintenance", "exit", "h2"]);

    // Conflicts and bad rules: refused, nothing stored.
    for (args, needle) in [
        (
            vec![
                "rule", "add", "lab", "together", "--kind", "affinity", "--vms", "a,b",
            ],
            "conflicts with rule apart",
        ),
        (
            vec![
                "rule",
                "add",
                "lab",
                "x",
                "--kind",
                "anti-affinity",
                "--vms",
                "a",
            ],
            "at least two VMs",
        ),
        (
            vec![
                "rule",
                "add",
                "lab",
                "y",
                "--kind",
                "must-run-on",
                "--vms",
                "a",
            ],
            "one host",
        ),
        (
            vec![
                "rule",
                "add",
                "lab",
                "z",
                "--kind",
                "anti-affinity",
                "--vms",
                "a,ghost",
            ],
            "ghost",
        ),
        (
            vec![
                "rule",
                "add",
                "lab",
                "apart",
                "--kind",
                "anti-affinity",
                "--vms",
                "a,b",
            ],
            "already exists",
        ),
        (
            vec![
                "rule", "add", "lab", "w", "--kind", "sideways", "--vms", "a,b",
            ],
            "rule kind",
        ),
    ] {
        let o = lab.tern(&args);
        assert!(!o.status.success(), "{args:?} accepted:\n{}", text(&o));
        assert!(text(&o).contains(needle), "{args:?}:\n{}", text(&o));
    }
    let rules: Vec<Value> = lab.tern_json(&["rule", "list", "lab"]);
    assert_eq!(rules.len(), 1, "{rules:?}");

    // must-run-on: a stays on h1, and maintenance of h1 names the rule.
    lab.tern_ok(&[
        "rule",
        "add",
        "lab",
        "pin",
        "--kind",
        "must-run-on",
        "--vms",
        "a",
        "--hosts",
        "h1",
    ]);
    let o = lab.tern(&[
        "rule",
        "add",
        "lab",
        "unpin",
        "--kind",
        "must-not-run-on",
        "--vms",
        "a",
        "--hosts",
        "h1",
    ]);
    assert!(text(&o).contains("conflicts with rule pin"), "{}", text(&o));
    let o = lab.tern(&["host", "maintenance", "enter", "h1"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("pin"), "{}", text(&o));
    lab.one_copy_on("a", &a, "h1");
    lab.tern_ok(&["host", "maintenance", "exit", "h1"]);

    // Removed, the rules bind nothing: b may join a on h1.
    lab.tern_ok(&["rule", "remove", "apart"]);
    lab.tern_ok(&["rule", "remove", "pin"]);
    let (o, task) = lab.migrate_json(&["b", "--to", "h1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(task.expect("task")["result"]["status"], "completed");
    lab.one_copy_on("b", &b_id, "h1");

    // A should rule gives way when nothing else fits, and says so; once a compliant host is
    // back, DRS proposes the move that keeps it.
    lab.tern_ok(&["host", "maintenance", "enter", "h2"]);
    lab.tern_ok(&[
        "rule",
        "add",
        "lab",
        "soft",
        "--kind",
        "should-run-on",
        "--vms",
        "b",
        "--hosts",
        "h2",
    ]);
    let r: Value = lab.tern_json(&["drs", "recommend", "lab"]);
    let said = r["text"].as_str().unwrap_or_default();
    assert!(
        said.contains("b still breaks should-rule soft"),
        "the broken should rule is reported: {r}"
    );
    assert!(
        r["recommendations"]
            .as_array()
            .is_some_and(|m| m.is_empty()),
        "{r}"
    );
    // h2 back: it has room now, but b migrated minutes ago, so the rule waits for b's
    // cooldown, and the report says that rather than "no room".
    lab.tern_ok(&["host", "maintenance", "exit", "h2"]);
    let r: Value = lab.tern_json(&["drs", "recommend", "lab"]);
    let said = r["text"].as_str().unwrap_or_default();
    assert!(
        said.contains("b still breaks should-rule soft: it cannot move now"),
        "{r}"
    );
    assert!(
        !r["recommendations"]
            .as_array()
            .is_some_and(|m| m.iter().any(|x| x["vm"] == "b")),
        "{r}"
    );
    lab.down();
}
