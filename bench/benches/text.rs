//! How fast message text becomes search terms: the word and CJK analysis every node runs
//! on every message it indexes (`chorus_search::text`), on the texts the load harness
//! posts and on ordinary prose in three scripts.
//!
//! Run it with `cargo bench -p chorus-bench --bench text`. Each input is analysed as the
//! index does, into both fields' terms; criterion reports the time per text and bytes per
//! second.

use chorus_search::text::{cjk_terms, words};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

/// The inputs: a name each, and its text.
fn inputs() -> Vec<(&'static str, String)> {
    vec![
        // `chorus-bench cluster`'s 256-byte body.
        ("cluster-body", "x".repeat(256)),
        (
            "english",
            "Can someone review the deploy PR before 3pm? The staging build failed twice on \
             the migration step, see #ops for logs."
                .to_string(),
        ),
        (
            "french",
            "Réunion déplacée à jeudi : l'équipe produit présentera la feuille de route, \
             café et croissants prévus."
                .to_string(),
        ),
        (
            "japanese",
            "明日の会議は午後三時からです。資料は共有フォルダにあります。".to_string(),
        ),
    ]
}

fn analyse(c: &mut Criterion) {
    let mut group = c.benchmark_group("text");
    for (name, text) in inputs() {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &text, |b, text| {
            b.iter(|| {
                let w = words(black_box(text));
                let c = cjk_terms(black_box(text));
                (w.len(), c.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, analyse);
criterion_main!(benches);
