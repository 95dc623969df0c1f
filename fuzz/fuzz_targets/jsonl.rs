//! The JSON Lines reader of `capsync push`: no panic, and every put's data is valid JSON.
#![no_main]

use capsync_client::jsonl;
use capsync_client::Change;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match jsonl::parse(text) {
        Ok(changes) => {
            for change in changes {
                if let Change::Put { data, .. } = change {
                    assert!(serde_json::from_slice::<serde_json::Value>(&data).is_ok(), "stored data is JSON");
                }
            }
        }
        Err((line, _)) => assert!(line >= 1 && line <= text.lines().count(), "the line number is in the file"),
    }
});
