//! What `capsync pull --json` and `capsync tail --json` print (issue 14, points 6 and 8): the
//! data exactly as the server stored it, never `null`, at any depth; and `tail` stops when its
//! reader goes away (`capsync tail | head`).

mod common;

use common::{capsync, new_session, Server, BIN};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Data a JSON parser would refuse or rewrite, each valid JSON the server accepts.
fn awkward_data() -> Vec<(&'static str, String)> {
    vec![
        ("deep", format!("{}\"bottom\"{}", "[".repeat(200), "]".repeat(200))),
        ("deep-object", format!("{}1{}", "{\"a\":".repeat(150), "}".repeat(150))),
        ("bignum", "123456789012345678901234567890".to_owned()),
        ("decimal", "{\"price\": 1.50, \"ratio\": 1e2}".to_owned()),
        ("escapes", "\"caf\\u00e9 \\ud83d\\ude00\"".to_owned()),
        ("order", "{\"z\":1,\"a\":2,\"z2\":[ ]}".to_owned()),
    ]
}

fn ops_file(dir: &std::path::Path) -> std::path::PathBuf {
    let lines: String = awkward_data()
        .iter()
        .map(|(id, data)| format!("{{\"op\":\"put\",\"kind\":\"message\",\"id\":\"{id}\",\"data\":{data}}}\n"))
        .collect();
    let path = dir.join("ops.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

#[derive(Deserialize)]
struct Shown {
    id: String,
    data: Box<RawValue>,
    #[serde(default)]
    seq: u64,
}

#[derive(Deserialize)]
struct Pulled {
    entities: Vec<Shown>,
}

fn assert_as_stored(shown: &[Shown], what: &str) {
    let expected = awkward_data();
    assert_eq!(shown.len(), expected.len(), "{what}: one entry per entity");
    for (id, data) in &expected {
        let entry = shown.iter().find(|s| s.id == *id).unwrap_or_else(|| panic!("{what}: `{id}` is missing"));
        assert_eq!(entry.data.get(), data, "{what}: `{id}` is shown as stored");
    }
}

#[test]
fn pull_and_tail_show_data_exactly_as_stored_and_tail_stops_when_its_reader_does() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let (_, owner) = new_session(&server);
    let uri = capsync_schema::SturdyUri::new(server.addr.clone(), owner).expose();
    let file = ops_file(dir.path());
    let pushed = capsync(&dir.path().join("writer.db"), &["push", &uri, "--file", file.to_str().unwrap()], &[]);
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));

    let pulled = capsync(&dir.path().join("reader.db"), &["pull", &uri, "--json"], &[]);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
    let pulled: Pulled = serde_json::from_slice(&pulled.stdout).expect("pull --json prints one JSON document");
    assert_as_stored(&pulled.entities, "pull --json");

    let mut tail = Command::new(BIN)
        .args(["tail", &uri, "--json"])
        .env("CAPSYNC_OUTBOX", dir.path().join("tail.db"))
        .env("RUST_LOG", "capsync_client=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut followed = Vec::new();
    // The tail's first pull takes the replica to the current cursor; once it follows, a second
    // push of the same ops under new ids gives it something to print.
    let mut logs = BufReader::new(tail.stderr.take().unwrap()).lines();
    assert!(logs.any(|l| l.unwrap().contains("following")), "tail never subscribed");
    std::thread::spawn(move || logs.for_each(drop));
    let again = std::fs::read_to_string(&file).unwrap().replace("\"id\":\"", "\"id\":\"t-");
    std::fs::write(&file, again).unwrap();
    let pushed = capsync(&dir.path().join("writer.db"), &["push", &uri, "--file", file.to_str().unwrap()], &[]);
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));
    while followed.len() < awkward_data().len() {
        let line = lines.next().expect("tail printed every op").unwrap();
        let mut shown: Shown = serde_json::from_str(&line).expect("tail --json prints JSON lines");
        shown.id = shown.id.trim_start_matches("t-").to_owned();
        followed.push(shown);
    }
    assert!(followed.windows(2).all(|w| w[0].seq < w[1].seq), "in seq order");
    assert_as_stored(&followed, "tail --json");

    // `capsync tail | head`: the reader goes away; the next op tail prints ends it.
    drop(lines);
    let put = capsync(&dir.path().join("writer.db"), &["put", &uri, "--kind", "message", "--id", "last", "--data", "{}"], &[]);
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = tail.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            tail.kill().unwrap();
            tail.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = status.expect("tail kept running after its stdout was closed");
    assert!(status.success(), "a closed stdout is a normal end for tail: {status:?}");
}
