//! Encode+frame and deframe+decode of one `Reading`.
//! Run: `cargo bench -p firmware-proto --bench frames`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use firmware_proto::frame::{Deframer, MAX_FRAME_SIZE_BYTES, encode_frame};
use firmware_proto::message::{Extra, Message, Reading};

fn reading() -> Message {
    let mut extras = heapless::Vec::new();
    let _ = extras.push(Extra {
        key: 1,
        value: 1013.25,
    });
    Message::Reading(Reading {
        seq: 123_456,
        boot_epoch: 42,
        timestamp_ms: 1_790_000_000_000,
        temperature: 21.5,
        humidity: 40.25,
        battery: 87.5,
        lat: 48.137_154,
        lon: 11.576_124,
        speed: 13.9,
        extras,
    })
}

fn frames(c: &mut Criterion) {
    let msg = reading();
    let mut buf = [0u8; MAX_FRAME_SIZE_BYTES];
    let n = encode_frame(1, &msg, &mut buf).expect("fits");
    let frame = buf[..n].to_vec();

    let mut g = c.benchmark_group("reading");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_frame", |b| {
        let mut out = [0u8; MAX_FRAME_SIZE_BYTES];
        b.iter(|| encode_frame(black_box(1), black_box(&msg), &mut out).expect("fits"))
    });
    g.bench_function("deframe_decode", |b| {
        let mut d = Deframer::new();
        b.iter(|| {
            let mut got = None;
            d.feed(black_box(&frame), |f| got = Some(f));
            got.expect("one frame").expect("decodes")
        })
    });
    g.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
