//! `switchboard test`: a plugin run offline over recorded events, compared with a
//! golden file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use switchboard::cli::test::{TestArgs, run};
use switchboard_tests::wasm;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn args(events: PathBuf, expect: Option<PathBuf>) -> TestArgs {
    TestArgs {
        plugin: wasm("billing"),
        events,
        expect,
        bless: false,
        config: vec![],
        state: None,
        name: None,
        exchange: "payments".into(),
        timeout: Duration::from_secs(5),
        memory: 64 << 20,
    }
}

/// Runs and returns (exit code, stdout lines, stderr).
fn test(args: &TestArgs) -> (i32, Vec<Value>, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run(args, &mut out, &mut err).unwrap();
    let lines = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (code, lines, String::from_utf8(err).unwrap())
}

#[test]
fn matches_the_golden_file() {
    let (code, lines, err) = test(&args(
        fixture("billing.events.jsonl"),
        Some(fixture("billing.golden.jsonl")),
    ));
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines.len(), 6, "one line per event");
    assert_eq!(lines[1]["outputs"][0]["type"], "bill.paid");
    assert_eq!(lines[1]["outputs"][0]["source"], "billing");
    assert_eq!(lines[1]["outputs"][0]["causation_id"], lines[1]["input"]);
    assert!(err.contains("all 6 lines match"), "{err}");
}

#[test]
fn a_changed_output_is_a_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let golden = std::fs::read_to_string(fixture("billing.golden.jsonl")).unwrap();
    let changed = golden.replacen("\"paid\"", "\"refunded\"", 1);
    assert_ne!(golden, changed);
    let path = dir.path().join("golden.jsonl");
    std::fs::write(&path, changed).unwrap();
    let (code, _, err) = test(&args(fixture("billing.events.jsonl"), Some(path)));
    assert_eq!(code, 1);
    assert!(err.contains("mismatch: line 2"), "{err}");
}

#[test]
fn an_unexpected_failure_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    // A payment for a bill nobody created: the plugin asks for a retry.
    std::fs::write(
        &events,
        r#"{"id":"x1","type":"payment.success","data":{"bill_id":"nope","payment_id":"p"}}"#,
    )
    .unwrap();
    let (code, lines, _) = test(&args(events.clone(), None));
    assert_eq!(code, 1);
    assert_eq!(lines[0]["failure"]["kind"], "retry");

    let golden = dir.path().join("golden.jsonl");
    std::fs::write(&golden, r#"{"input":"x1","outputs":[]}"#).unwrap();
    assert_eq!(test(&args(events.clone(), Some(golden.clone()))).0, 1);
    std::fs::write(&golden, r#"{"input":"x1","failure":{"kind":"retry"}}"#).unwrap();
    assert_eq!(
        test(&args(events, Some(golden))).0,
        0,
        "an expected failure is fine"
    );
}

#[test]
fn bless_writes_a_golden_file_that_then_matches() {
    let dir = tempfile::tempdir().unwrap();
    let golden = dir.path().join("golden.jsonl");
    let mut a = args(fixture("billing.events.jsonl"), Some(golden.clone()));
    a.bless = true;
    assert_eq!(test(&a).0, 0);
    assert!(
        !std::fs::read_to_string(&golden)
            .unwrap()
            .contains("timestamp")
    );
    a.bless = false;
    assert_eq!(test(&a).0, 0);
}

#[test]
fn state_persists_with_a_state_folder() {
    let dir = tempfile::tempdir().unwrap();
    let bill = dir.path().join("bill.jsonl");
    let pay = dir.path().join("pay.jsonl");
    std::fs::write(
        &bill,
        r#"{"id":"a","type":"bill.created","data":{"bill_id":"b1","amount":3}}"#,
    )
    .unwrap();
    std::fs::write(
        &pay,
        r#"{"id":"b","type":"payment.success","data":{"bill_id":"b1","payment_id":"p1"}}"#,
    )
    .unwrap();
    let mut a = args(bill, None);
    a.state = Some(dir.path().join("state"));
    assert_eq!(test(&a).0, 0);
    a.events = pay.clone();
    let (code, lines, _) = test(&a);
    assert_eq!(code, 0, "the bill from the first run is known");
    assert_eq!(lines[0]["outputs"][0]["type"], "bill.paid");
    // Without --state, every run starts empty.
    assert_eq!(test(&args(pay, None)).0, 1);
}

#[test]
fn unusable_input_is_an_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    std::fs::write(&events, "{\"type\":\"ok\",\"data\":{}}\n{broken\n").unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let error = run(&args(events.clone(), None), &mut out, &mut err).unwrap_err();
    assert!(format!("{error:#}").contains("events.jsonl:2"), "{error:#}");
    std::fs::write(&events, "{\"type\":\"ok\",\"data\":{}}\n").unwrap();
    let mut a = args(events, None);
    a.plugin = dir.path().join("missing.wasm");
    let error = run(&a, &mut out, &mut err).unwrap_err();
    assert!(format!("{error:#}").contains("cannot read"), "{error:#}");
}
