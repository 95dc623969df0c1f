//! Big inputs in bounded memory: a 50 MB rollout (generated at test time), and — ignored by
//! default, for the import measurement — a 10,000-session, 1 GB tree.
//!
//! A counting allocator measures the heap this test binary uses at its peak.

mod common;

use capsync_agents::fixtures::{generate_codex, rollout_path, write_rollout, Rng};
use capsync_agents::safety::SafeRoot;
use capsync_agents::{codex, Limits};
use common::*;
use sha2::{Digest, Sha256};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: usize = 1024 * 1024;

/// The heap grown above what was in use when `f` started, at its peak.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

struct HashWriter(Sha256, u64);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_50_mb_rollout_parses_in_bounded_memory_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let id = "01987a00-0000-7000-8000-000000000050";
    let rel = rollout_path(1_754_388_000_000, id);
    let path = dir.path().join(&rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        // Every 40th tool output is 700 KB: over the inline cap, so it rides in chunks.
        write_rollout(&mut out, &mut Rng::new(50), id, 1_754_388_000_000, 50 * 1000 * 1000, 40).unwrap();
        out.flush().unwrap();
    }
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size >= 50_000_000, "{size}");

    let root = SafeRoot::new(dir.path()).unwrap();
    let ((records, data_bytes, lines), peak) = peak_during(|| {
        let mut reader = codex::CodexReader::open(&root, &rel, TARGET, None, Limits::default()).unwrap();
        let (mut records, mut bytes) = (0u64, 0u64);
        for record in reader.by_ref() {
            let record = record.unwrap();
            records += 1;
            bytes += record.entity.data.len() as u64;
        }
        assert!(reader.take_warnings().is_empty());
        (records, bytes, reader.cursor().line)
    });
    assert!(records > lines && data_bytes >= size, "{records} records, {data_bytes} bytes");
    eprintln!("{size} bytes, {lines} lines, {records} records: peak heap {:.1} MiB", peak as f64 / MIB as f64);
    assert!(peak < 32 * MIB, "reading a {size}-byte rollout took {} MiB of heap at its peak", peak / MIB);

    // The round trip of the whole file, chunks and all.
    let (records, _, _) = read_all(dir.path(), &rel, None, Limits::default());
    let state = replica(&records);
    drop(records);
    assert!(state.iter().any(|e| String::from_utf8_lossy(&e.data).contains("\"chunk_of\"")), "some lines are chunked");
    let mut out = HashWriter(Sha256::new(), 0);
    let report = codex::export_codex(&state, &mut out).unwrap();
    assert!(report.missing.is_empty());
    let mut file = HashWriter(Sha256::new(), 0);
    std::io::copy(&mut std::fs::File::open(&path).unwrap(), &mut file).unwrap();
    assert_eq!((out.1, out.0.finalize()), (file.1, file.0.finalize()), "the export is the file, byte for byte");
}

/// The import measurement: 10,000 sessions, 1 GB, one session at a time. Slow in a debug
/// build; run with `cargo test -p capsync-agents --test large -- --ignored`.
#[test]
#[ignore]
fn ten_thousand_sessions_of_one_gigabyte_in_under_200_mib() {
    let dir = tempfile::tempdir().unwrap();
    let generated = generate_codex(dir.path(), 10_000, 1_000_000_000, 10, 50).unwrap();
    assert_eq!(generated.sessions, 10_000);
    let ((sessions, records), peak) = peak_during(|| {
        let discovery = codex::discover(dir.path(), Limits::default()).unwrap();
        let root = discovery.root().clone();
        let (mut sessions, mut records) = (0u64, 0u64);
        for found in discovery {
            let session = found.unwrap();
            let reader = codex::CodexReader::for_session(&root, &session, TARGET, None, Limits::default()).unwrap();
            for record in reader {
                record.unwrap();
                records += 1;
            }
            sessions += 1;
        }
        (sessions, records)
    });
    assert_eq!(sessions, 10_000);
    assert!(records >= generated.records);
    eprintln!("{sessions} sessions, {records} records, {} bytes; peak heap {} MiB", generated.bytes, peak / MIB);
    assert!(peak < 200 * MIB);
}
