//! Chunkers and hashing, in memory.
#![allow(missing_docs)] // criterion_group! generates an undocumented function

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_core::chunker::{split_all, Cdc, ResourceChunker};
use ferry_tests::tree::Content;

const LEN: usize = 64 << 20;

/// A compressed-resource look-alike: chunk table + chunks of 12–20 KiB.
fn resource(len: usize) -> (Vec<u8>, u64) {
    let mut c = Content::new(3);
    let mut sizes = Vec::new();
    let mut total = 0;
    while total < len {
        let s = 12_000 + c.below(8_000);
        sizes.push(s);
        total += s;
    }
    let mut out = Vec::with_capacity(total + sizes.len() * 4);
    let mut off = 0u32;
    for s in &sizes[..sizes.len() - 1] {
        off += *s as u32;
        out.extend(off.to_le_bytes());
    }
    out.extend(c.bytes(total));
    (out, sizes.len() as u64 * 32768)
}

fn bench(c: &mut Criterion) {
    let data = Content::new(1).bytes(LEN);
    let (res, unc) = resource(LEN);
    let mut g = c.benchmark_group("chunking");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(LEN as u64));
    g.bench_function(BenchmarkId::new("fastcdc", "64MiB"), |b| {
        b.iter(|| split_all(&mut Cdc::default(), &data).len())
    });
    g.bench_function(BenchmarkId::new("resource", "64MiB"), |b| {
        b.iter(|| {
            split_all(
                &mut ResourceChunker::new(res.len() as u64, unc, 32768),
                &res,
            )
            .len()
        })
    });
    g.bench_function(BenchmarkId::new("blake3", "64MiB"), |b| {
        b.iter(|| blake3::hash(&data))
    });
    g.bench_function(BenchmarkId::new("cdc+blake3 per chunk", "64MiB"), |b| {
        b.iter(|| {
            let mut pos = 0;
            for n in split_all(&mut Cdc::default(), &data) {
                std::hint::black_box(blake3::hash(&data[pos..pos + n]));
                pos += n;
            }
        })
    });
    // A DP receives each chunk in packet-sized pieces (issue 24): BLAKE3
    // over the pieces as they are (`read_chunk`, no copy) against copying
    // them into one buffer and hashing that (what `read_frame` does).
    let chunk = 256 << 10;
    for piece in [1_452usize, 6_550] {
        g.bench_function(
            BenchmarkId::new(
                "blake3 of 256 KiB chunks, in place",
                format!("{piece} B pieces"),
            ),
            |b| {
                b.iter(|| {
                    for c in data.chunks(chunk) {
                        let mut h = blake3::Hasher::new();
                        for p in c.chunks(piece) {
                            h.update(p);
                        }
                        std::hint::black_box(h.finalize());
                    }
                })
            },
        );
        g.bench_function(
            BenchmarkId::new(
                "blake3 of 256 KiB chunks, copied whole",
                format!("{piece} B pieces"),
            ),
            |b| {
                let mut buf = Vec::with_capacity(chunk);
                b.iter(|| {
                    for c in data.chunks(chunk) {
                        buf.clear();
                        for p in c.chunks(piece) {
                            buf.extend_from_slice(p);
                        }
                        std::hint::black_box(blake3::hash(&buf));
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
