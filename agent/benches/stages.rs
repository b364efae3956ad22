//! Per-stage benchmarks of the data plane: JSON and binary decode with
//! validation, the geofence step, record encoding, and the outbox batch
//! commit (with registry lookup, 200 fences, dedupe and device state).
//!
//! `cargo bench -p edge-agent --bench stages`

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use edge_agent::config::{Config, SyncMode, ValidationConfig};
use edge_agent::outbox::{Item, Outbox, Raw};
use edge_agent::transforms::geofence::{DeviceFences, FenceIndex, parse_fences};
use edge_agent::transforms::validate::{EnrichedRecord, decode_bin_reading, decode_reading};

const DEVICES: usize = 10_000;
const FENCES: usize = 200;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn payload(device: usize, seq: u64, ts: i64, angle: f64) -> Vec<u8> {
    let (lat, lon) = position(angle);
    format!(
        r#"{{"device_id":"sim-{device:05}","seq":{seq},"epoch":1790000000,"ts":{ts},"temperature":21.37,"humidity":48.2,"battery":87.5,"lat":{lat},"lon":{lon},"speed":12.25}}"#
    )
    .into_bytes()
}

/// Positions on a circle of radius 0.01° around Munich, like `edge-sim`.
fn position(angle: f64) -> (f64, f64) {
    (
        48.137 + 0.01 * angle.sin(),
        11.575 + 0.01 * angle.cos() / 0.667,
    )
}

/// 200 squares scattered within three radii of the circle's centre, each
/// 0.4 radius wide (the geometry of `edge-sim registry`): some lie across
/// the track, so devices enter and leave one every few dozen readings.
fn fences_json() -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        // A fixed linear congruential sequence: the same fences every run.
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (x >> 11) as f64 / (1u64 << 53) as f64 * 6.0 - 3.0
    };
    let features: Vec<String> = (0..FENCES)
        .map(|i| {
            let (lat, lon) = (48.137 + 0.01 * next(), 11.575 + 0.01 * next() / 0.667);
            let (dlat, dlon) = (0.002, 0.002 / 0.667);
            format!(
                r#"{{"type":"Feature","properties":{{"id":"fence-{i:04}","dwell_seconds":30,"absent_seconds":300}},"geometry":{{"type":"Polygon","coordinates":[[[{a},{b}],[{c},{b}],[{c},{d}],[{a},{d}],[{a},{b}]]]}}}}"#,
                a = lon - dlon,
                b = lat - dlat,
                c = lon + dlon,
                d = lat + dlat
            )
        })
        .collect();
    format!(
        r#"{{"type":"FeatureCollection","features":[{}]}}"#,
        features.join(",")
    )
}

fn registry_json() -> String {
    let devices: Vec<String> = (0..DEVICES)
        .map(|d| format!(r#"{{"device_id":"sim-{d:05}","device_type":"tracker","site":"sim","tags":{{"fleet":"f{}"}}}}"#, d % 10))
        .collect();
    format!(
        r#"{{"version":"bench","devices":[{}],"fences":{}}}"#,
        devices.join(","),
        fences_json()
    )
}

fn decode(c: &mut Criterion) {
    let limits = ValidationConfig::default();
    let now = now_ms();
    let json = payload(42, 7, now, 1.0);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("json_reading", |b| {
        b.iter(|| decode_reading(black_box(&json), Some("sim-00042"), now, &limits))
    });
    let frame = {
        use firmware_proto::message::{Message, Reading};
        let reading = Reading {
            seq: 7,
            boot_epoch: 1_790_000_000,
            timestamp_ms: now as u64,
            temperature: 21.4,
            humidity: 48.2,
            battery: 87.5,
            lat: 48.14,
            lon: 11.57,
            speed: 12.25,
            extras: Default::default(),
        };
        let mut buf = [0u8; firmware_proto::frame::MAX_FRAME_SIZE_BYTES];
        let n = firmware_proto::frame::encode_frame(1, &Message::Reading(reading), &mut buf)
            .expect("a reading fits in a frame");
        buf[..n].to_vec()
    };
    g.bench_function("bin_reading", |b| {
        b.iter(|| decode_bin_reading(black_box(&frame), "sim-00042", now, &limits))
    });
    let reading = decode_reading(&json, None, now, &limits).expect("valid");
    let mut out = Vec::with_capacity(512);
    g.bench_function("encode_enriched", |b| {
        b.iter(|| {
            out.clear();
            EnrichedRecord::new(&reading, None, "gw", now).write_json(&mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

fn geofence(c: &mut Criterion) {
    let index = FenceIndex::new(parse_fences(&fences_json()).expect("valid fences"));
    let mut g = c.benchmark_group("geofence");
    g.throughput(Throughput::Elements(1));
    let mut state = DeviceFences::default();
    let mut i = 0u64;
    g.bench_function("step_200_fences", |b| {
        b.iter(|| {
            i += 1;
            let (lat, lon) = position(i as f64 * 0.02);
            black_box(state.step(&index, "sim-00001", i, i as i64 * 1000, lat, lon))
        })
    });
    g.finish();
}

fn outbox(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("registry.json"), registry_json()).expect("write registry");
    let config = Config::from_toml(
        &format!(
            "gateway_id = \"bench\"\ndata_dir = \"{0}\"\n[sources.demo]\n[kafka]\nbrokers = \"127.0.0.1:1\"\n\
             [outbox]\nsynchronous = \"normal\"\n[registry]\nfile = \"{0}/registry.json\"\n",
            dir.path().display()
        ),
        "bench",
    )
    .expect("config");
    assert_eq!(config.outbox.synchronous, SyncMode::Normal);
    let mut outbox: Outbox = edge_agent::open_outbox(&config).expect("outbox");
    let limits = ValidationConfig::default();
    let now = now_ms();
    const BATCH: usize = 4096;
    let mut seq = 0u64;
    let mut g = c.benchmark_group("outbox");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("decode_and_commit_4096", |b| {
        b.iter_batched(
            || {
                seq += 1;
                // Device by device as `edge-sim jsonl` writes them, each
                // moving 0.02 rad along its circle per reading.
                (0..BATCH)
                    .map(|i| {
                        let n = (seq as usize - 1) * BATCH + i;
                        let (device, round) = (n % DEVICES, (n / DEVICES) as u64 + 1);
                        let angle = device as f64 * 0.7 + round as f64 * 0.02;
                        payload(device, round, now - 3_600_000 + round as i64 * 1000, angle)
                    })
                    .collect::<Vec<_>>()
            },
            |payloads| {
                let mut items: Vec<Item> = payloads
                    .iter()
                    .map(|p| {
                        Item::Reading(
                            decode_reading(p, None, now, &limits).expect("valid"),
                            Raw::Bytes {
                                source: "bench",
                                topic: "",
                                payload: p,
                            },
                        )
                    })
                    .collect();
                outbox.write_batch(&mut items, now).expect("commit")
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, decode, geofence, outbox);
criterion_main!(benches);
