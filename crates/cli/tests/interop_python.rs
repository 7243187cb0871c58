//! Interoperability with a client written from `docs/wire-format.md` alone:
//! the real `eventplane publish` binary publishes over ZMQ with file
//! discovery, and `tests/interop/zmq_subscriber.py` (pyzmq + msgpack, no
//! eventplane code) finds it, subscribes, validates every message and
//! reports what it received.
//!
//! The Python interpreter is `$EVENTPLANE_PYTHON`, else `<workspace>/.venv/bin/python`
//! (created by `scripts/test.sh`). Without either the test is skipped, unless
//! `CI` is set, where it fails.

mod common;

use common::Proc;
use std::process::Command;

const COUNT: u64 = 50;
const PUBLISHER_ID: u64 = 77;
const NAMESPACE: &str = "dynamo";
const COMPONENT: &str = "comp";
const TOPIC: &str = "topic-x";
const VALUE: &str = r#"{"blocks":[1,2,18446744073709551615],"name":"w1"}"#;

#[test]
fn python_subscriber_written_from_the_spec_receives_everything() {
    let root = common::workspace_root();
    let Some(python) = common::python(&root, &["zmq", "msgpack"]) else {
        return;
    };
    let script = root.join("tests/interop/zmq_subscriber.py");
    assert!(script.exists(), "{} is missing", script.display());
    let dir = tempfile::tempdir().expect("tempdir");

    let publisher = Proc::spawn(
        "publisher",
        Command::new(env!("CARGO_BIN_EXE_eventplane"))
            .args(["publish", "--discovery", "file", "--discovery-dir"])
            .arg(dir.path())
            .args([
                "--event-plane",
                "zmq",
                "-n",
                NAMESPACE,
                "-c",
                COMPONENT,
                "-t",
                TOPIC,
            ])
            .args([
                "--publisher-id",
                &PUBLISHER_ID.to_string(),
                "--value",
                VALUE,
            ])
            .args(["--count", &COUNT.to_string(), "--rate", "1000"])
            .args(["--wait-subscribers", "1", "--hold"])
            .env("EVENTPLANE_LOG", "warn"),
    );
    let ready = publisher.until_type("ready");
    assert_eq!(ready["publisher_id"], PUBLISHER_ID, "ready line: {ready}");
    let incarnation = ready["incarnation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no incarnation in the ready line: {ready}"));
    let subject = ready["subject"]
        .as_str()
        .expect("subject in the ready line")
        .to_owned();

    let mut subscriber = Proc::spawn(
        "python subscriber",
        Command::new(&python)
            .arg(&script)
            .arg("--discovery-dir")
            .arg(dir.path())
            .args([
                "--namespace",
                NAMESPACE,
                "--component",
                COMPONENT,
                "--topic",
                TOPIC,
            ])
            .args(["--count", &COUNT.to_string(), "--timeout", "30"]),
    );
    subscriber.until(|l| l["ready"] == true, |_| {});
    let result = subscriber.until(|l| l.get("messages").is_some(), |_| {});
    let status = subscriber.wait();
    assert!(status.success(), "python subscriber exited with {status}");

    let published = publisher.until_type("published");
    assert_eq!(published["count"], COUNT, "published line: {published}");
    drop(publisher);

    assert_eq!(
        result["subject"],
        subject.as_str(),
        "subject computed in Python"
    );
    assert_eq!(result["gaps"], 0, "gaps: {}", result["gaps"]);
    let messages = result["messages"].as_array().expect("messages array");
    assert_eq!(messages.len() as u64, COUNT);
    let expected: serde_json::Value = serde_json::from_str(VALUE).unwrap();
    for (i, m) in messages.iter().enumerate() {
        let seq = i as u64 + 1;
        assert_eq!(m["publisher_id"], PUBLISHER_ID, "message {i}: {m}");
        assert_eq!(m["incarnation"], incarnation, "message {i}: {m}");
        assert_eq!(m["seq"], seq, "message {i}: {m}");
        assert!(
            m["timestamp_ns"].as_u64().is_some_and(|t| t > 0),
            "message {i}: {m}"
        );
        assert_eq!(m["value"], expected, "message {i}: {m}");
    }
}
