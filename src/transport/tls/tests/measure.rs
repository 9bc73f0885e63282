//! Measurements of the record layer, run by hand (ignored in the suite):
//! `cargo test --profile ci --lib tls::tests::measure -- --ignored --nocapture`.

use super::*;

/// Throughput of the record layer: one writer thread sealing guest pages, one reader
/// opening them into guest pages, over a Unix socket pair. Run with
/// `cargo test --profile ci --lib tls::tests::measure -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check: run by hand"]
fn throughput() {
    const TOTAL: usize = 4 << 30;
    const BUF: usize = 64 << 20;
    for tls in [false, true] {
        let (c, s) = if tls { ok_pair() } else { unix_pair() };
        let start = Instant::now();
        let t = std::thread::spawn(move || {
            let mut src = pattern(BUF, 5);
            let ps = pages(&mut src);
            for _ in 0..TOTAL / BUF {
                for group in ps.chunks(128) {
                    let mut iov = IoVecs::with_capacity(128);
                    for p in group {
                        iov.push_page(*p);
                    }
                    c.write_all_iovecs(&mut iov).unwrap();
                }
            }
        });
        let mut dst = vec![0u8; BUF];
        let ps = pages(&mut dst);
        for _ in 0..TOTAL / BUF {
            for group in ps.chunks(128) {
                let mut iov = IoVecs::with_capacity(128);
                for p in group {
                    iov.push_page_to_fill(*p);
                }
                s.read_exact_iovecs(&mut iov).unwrap();
            }
        }
        t.join().unwrap();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{}: {:.2} GB/s",
            if tls { "TLS" } else { "clear" },
            TOTAL as f64 / secs / 1e9
        );
    }
}

/// The record cipher alone, single-threaded: the ceiling of the record layer.
#[test]
#[ignore = "a measurement, not a check: run by hand"]
fn cipher_throughput() {
    use rustls::crypto::cipher::{AeadKey, Iv, OutboundChunks, OutboundPlainMessage};
    let suites = rustls::crypto::ring::default_provider().cipher_suites;
    let data = pattern(1 << 14, 1);
    for s in suites {
        #[allow(irrefutable_let_patterns)]
        let rustls::SupportedCipherSuite::Tls13(t) = s
        else {
            continue;
        };
        if t.aead_alg.key_len() != 32 {
            continue;
        }
        let mut enc = t
            .aead_alg
            .encrypter(AeadKey::from([7u8; 32]), Iv::from([1u8; 12]));
        let n = 20_000u64;
        let start = Instant::now();
        for seq in 0..n {
            let msg = OutboundPlainMessage {
                typ: rustls::ContentType::ApplicationData,
                version: rustls::ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(&data),
            };
            let r = enc.encrypt(msg, seq).unwrap();
            std::hint::black_box(r.encode());
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{:?} seal: {:.2} GB/s",
            s.suite(),
            n as f64 * data.len() as f64 / secs / 1e9
        );
    }
}
