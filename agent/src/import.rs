//! `edge-agent import FILE.jsonl`: replays a JSON-lines file (backfill of
//! offline logs) through the same validation and outbox as live input, with
//! a progress line. The running agent (or its next start) ships the result.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::pipeline::{AckRouter, BatchWriter, Envelope, LineChunk};
use crate::signal::OutboxSignals;
use crate::stats::Stats;

/// What an import did.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportSummary {
    pub lines: u64,
    pub bytes: u64,
    pub valid: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub seconds: f64,
}

/// Lines handed to the batch writer together, at most. Large: every
/// chunk may wake the writer thread, and on one core each wake-up is a
/// switch between the reader and the writer (1,024 instead of 64 lines
/// made the import pinned to one core about 13 % faster). The queue holds
/// `INPUT_QUEUE` lines either way.
const CHUNK_LINES: usize = 1024;
/// Bytes of lines handed over together: a chunk is sent once it holds this
/// many.
const CHUNK_BYTES: usize = 256 * 1024;

/// Appends one line of at most `limit` bytes to `buf` (without the
/// newline). A longer line is consumed to its end and appended truncated to
/// `limit + 1` bytes, so the caller rejects it without ever holding it whole.
/// Returns the bytes consumed, 0 at the end of the input.
fn read_bounded_line(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<usize> {
    let start = buf.len();
    let mut consumed = 0;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(consumed);
        }
        let (chunk, found) = match memchr::memchr(b'\n', available) {
            Some(i) => (&available[..i], Some(i)),
            None => (available, None),
        };
        let room = (limit + 1).saturating_sub(buf.len() - start);
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = found.map_or(chunk.len(), |i| i + 1);
        reader.consume(used);
        consumed += used;
        if found.is_some() {
            return Ok(consumed);
        }
    }
}

/// Imports `path` into the outbox of `config`. The agent must not be running
/// on the same data folder (the data-folder lock enforces it).
pub async fn import(
    config: Config,
    stats: Arc<Stats>,
    path: &Path,
    show_progress: bool,
) -> anyhow::Result<ImportSummary> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data folder {}", config.data_dir.display()))?;
    let _lock = crate::lock::lock_data_dir(&config.data_dir)?;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let outbox = {
        let cfg = config.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let outbox = crate::open_outbox(&cfg)?;
            let backlog = outbox.backlog()?;
            Ok((outbox, backlog))
        })
        .await
        .context("opening the outbox")??
    };
    let (outbox, (batches, bytes)) = outbox;
    stats.outbox_batches.store(batches, Relaxed);
    stats.outbox_bytes.store(bytes, Relaxed);
    // As many lines queued as the live sources may queue.
    let (tx, rx) = mpsc::channel(crate::INPUT_QUEUE / CHUNK_LINES);
    let (_stop_tx, stop_rx) = watch::channel(false);
    let signals = Arc::new(OutboxSignals::default());
    let mut writer = BatchWriter::new(
        &config,
        outbox,
        stats.clone(),
        signals,
        AckRouter::default(),
    );
    writer.stop_when_full = true;
    let rt = tokio::runtime::Handle::current();
    let writer_thread = std::thread::Builder::new()
        .name("batch-writer".into())
        .spawn(move || writer.run(rt, rx, stop_rx))
        .context("starting the batch writer thread")?;

    let started = Instant::now();
    let read_bytes = Arc::new(AtomicU64::new(0));
    let progress = show_progress.then(|| {
        let (stats, read_bytes) = (stats.clone(), read_bytes.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "{}",
                    progress_line(&stats, read_bytes.load(Relaxed), total, started.elapsed())
                );
            }
        })
    });

    let limit = config.validation.max_payload_bytes;
    let reader_path = path.to_path_buf();
    let reader_bytes = read_bytes.clone();
    let file_name: Arc<str> = path.display().to_string().into();
    // A chunk never holds more lines than a batch may.
    let chunk_lines = CHUNK_LINES.min(config.outbox.batch_max_records);
    let lines = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut reader = BufReader::with_capacity(1 << 20, file.take(u64::MAX));
        let new_chunk =
            || LineChunk::new("import", file_name.clone(), CHUNK_BYTES + 1024, chunk_lines);
        let mut chunk = new_chunk();
        let mut lines = 0u64;
        let full = |lines: u64| {
            anyhow::anyhow!(
                "stopped at line {lines}: the outbox is full (outbox.max_size_bytes). Start the agent to ship \
                 the backlog, then import again: lines already imported are skipped as duplicates"
            )
        };
        loop {
            let start = chunk.next_start();
            let n = read_bounded_line(&mut reader, &mut chunk.bytes, limit)
                .with_context(|| format!("reading {}", reader_path.display()))?;
            if n == 0 {
                if !chunk.ends.is_empty() && tx.blocking_send(Envelope::Lines(chunk)).is_err() {
                    return Err(full(lines));
                }
                return Ok(lines);
            }
            reader_bytes.fetch_add(n as u64, Relaxed);
            lines += 1;
            if chunk.bytes[start..].iter().all(u8::is_ascii_whitespace) {
                chunk.bytes.truncate(start);
                continue;
            }
            chunk.end_line(lines);
            if (chunk.ends.len() >= chunk_lines || chunk.bytes.len() >= CHUNK_BYTES)
                && tx
                    .blocking_send(Envelope::Lines(std::mem::replace(&mut chunk, new_chunk())))
                    .is_err()
            {
                return Err(full(lines));
            }
        }
    })
    .await
    .context("reading the import file")??;
    tokio::task::spawn_blocking(move || writer_thread.join())
        .await
        .context("joining the batch writer")?
        .map_err(|_| anyhow::anyhow!("the batch writer panicked"))?;
    if let Some(p) = progress {
        p.abort();
    }
    // The writer stops when the outbox fills; lines still queued then were
    // read but never stored.
    let stored =
        stats.valid.load(Relaxed) + stats.rejected.load(Relaxed) + stats.duplicates.load(Relaxed);
    if stats.outbox_full.load(Relaxed) {
        anyhow::bail!(
            "the outbox is full (outbox.max_size_bytes) after {stored} readings of {lines} lines. Start the agent to \
             ship the backlog, then import again: lines already imported are skipped as duplicates"
        );
    }
    let summary = ImportSummary {
        lines,
        bytes: read_bytes.load(Relaxed),
        valid: stats.valid.load(Relaxed),
        rejected: stats.rejected.load(Relaxed),
        duplicates: stats.duplicates.load(Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    };
    if show_progress {
        eprintln!(
            "{}",
            progress_line(&stats, summary.bytes, total, started.elapsed())
        );
    }
    Ok(summary)
}

fn progress_line(stats: &Stats, read: u64, total: u64, elapsed: Duration) -> String {
    let done =
        stats.valid.load(Relaxed) + stats.rejected.load(Relaxed) + stats.duplicates.load(Relaxed);
    let pct = if total > 0 {
        read as f64 * 100.0 / total as f64
    } else {
        100.0
    };
    let width = 30;
    let filled = ((pct / 100.0) * width as f64).round() as usize;
    format!(
        "[{}{}] {pct:5.1}% {} / {} MiB | {done} readings ({:.0}/s) valid {} rejected {} dup {}",
        "#".repeat(filled.min(width)),
        "-".repeat(width - filled.min(width)),
        read >> 20,
        total >> 20,
        done as f64 / elapsed.as_secs_f64().max(1e-3),
        stats.valid.load(Relaxed),
        stats.rejected.load(Relaxed),
        stats.duplicates.load(Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_bounded_and_consumed() {
        let input = format!("short\n{}\nafter\nlast-without-newline", "x".repeat(10_000));
        let mut reader = BufReader::with_capacity(64, input.as_bytes());
        // Lines are appended to what the buffer holds, each bounded alone.
        let mut buf = b"before".to_vec();
        let mut lines = Vec::new();
        loop {
            let start = buf.len();
            let n = read_bounded_line(&mut reader, &mut buf, 100).unwrap();
            if n == 0 {
                break;
            }
            lines.push((n, buf.len() - start));
        }
        assert_eq!(lines, vec![(6, 5), (10_001, 101), (6, 5), (20, 20)]);
        let expected = format!("beforeshort{}afterlast-without-newline", "x".repeat(101));
        assert_eq!(String::from_utf8(buf).unwrap(), expected);
    }

    /// A chunk never takes a batch past `outbox.batch_max_records`,
    /// whether the bound is below a chunk's lines or not a multiple of
    /// them, and every line arrives once.
    #[test]
    fn imported_batches_keep_to_the_record_bound() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        for (max_records, lines) in [(100usize, 1_050u64), (1_500, 5_000)] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("in.jsonl");
            let mut text = String::new();
            for i in 0..lines {
                text.push_str(&format!(
                    "{{\"device_id\":\"d{}\",\"seq\":{},\"ts\":{},\"temperature\":20.5,\"humidity\":50.0,\"battery\":90.0,\"lat\":1.0,\"lon\":2.0,\"speed\":0.0}}\n",
                    i % 37,
                    i / 37 + 1,
                    crate::pipeline::now_ms(),
                ));
            }
            std::fs::write(&file, text).unwrap();
            let config = Config::from_toml(
                &format!(
                    "gateway_id = \"gw\"\ndata_dir = {:?}\n[sources.demo]\n[kafka]\nbrokers = \"127.0.0.1:1\"\n\
                     [outbox]\nbatch_max_records = {max_records}\n[progress]\ninterval_seconds = 0\n",
                    dir.path().join("data")
                ),
                "test",
            )
            .unwrap();
            let summary = runtime
                .block_on(import(
                    config.clone(),
                    Arc::new(Stats::default()),
                    &file,
                    false,
                ))
                .unwrap();
            assert_eq!((summary.lines, summary.valid), (lines, lines));
            let conn = rusqlite::Connection::open(config.database_path()).unwrap();
            let (largest, total): (i64, i64) = conn
                .query_row(
                    "SELECT MAX(records), SUM(records) FROM outbox_batch",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert!(largest <= max_records as i64, "{largest} > {max_records}");
            assert_eq!(total, lines as i64);
        }
    }

    #[test]
    fn a_chunk_gives_back_its_lines_with_their_numbers() {
        let mut chunk = LineChunk::new("import", "f.jsonl".into(), 16, 4);
        for (number, text) in [(1, "a"), (3, "bc"), (4, "")] {
            chunk.bytes.extend_from_slice(text.as_bytes());
            chunk.end_line(number);
        }
        let lines: Vec<(u64, &[u8])> = chunk.lines().collect();
        assert_eq!(lines, vec![(1, &b"a"[..]), (3, b"bc"), (4, b"")]);
        assert_eq!(chunk.next_start(), 3);
    }
}
