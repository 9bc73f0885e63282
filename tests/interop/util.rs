//! Tests of the support crate's `util` (they run here, with the interop suite: the support
//! crate is not among the workspace's default members).

#[cfg(test)]
mod tests {
    use support::util::*;

    #[test]
    fn fill_mixed_counts_zero_pages() {
        let mut buf = vec![0xaau8; 64 * PAGE_SIZE + 100];
        let zeros = fill_mixed(&mut buf, 7, 0.5);
        let counted = buf
            .chunks(PAGE_SIZE)
            .filter(|p| p.iter().all(|&b| b == 0))
            .count();
        assert_eq!(zeros, counted);
        assert!(zeros > 0 && zeros < 65);
        let mut again = vec![0u8; buf.len()];
        fill_mixed(&mut again, 7, 0.5);
        assert_same_memory(&buf, &again, "same seed");
    }

    #[test]
    fn assert_same_memory_reports_first_page() {
        let a = vec![1u8; 8 * MIB as usize];
        let mut b = a.clone();
        b[3 * PAGE_SIZE + 5] = 0;
        b[1000 * PAGE_SIZE] = 0;
        assert_same_memory(&a, &a.clone(), "same");
        let msg = compare_memory(&a, &b).unwrap_err();
        assert!(msg.contains("first differing page 3 "), "{msg}");
        assert!(msg.contains("2 of 2048 pages differ"), "{msg}");
    }

    #[test]
    fn file_uris_and_json_integers() {
        let p = std::path::Path::new("/tmp/x.mig");
        assert_eq!(file_uri(p, 0), "file:/tmp/x.mig");
        assert_eq!(file_uri(p, 4096), "file:/tmp/x.mig,offset=4096");
        let v = serde_json::json!({"ram": {"normal": 3, "mbps": 1.5}});
        assert_eq!(u64_at(&v, &["ram", "normal"]), 3);
        for bad in [&["ram", "mbps"][..], &["ram", "nope"]] {
            assert!(std::panic::catch_unwind(|| u64_at(&v, bad)).is_err());
        }
    }

    #[test]
    fn temp_dir_is_removed() {
        let d = TempDir::new("qmh-util-test");
        let p = d.path().to_path_buf();
        std::fs::write(d.join("f"), b"x").unwrap();
        assert_ne!(unique_name("a"), unique_name("a"));
        drop(d);
        assert!(!p.exists());
    }
}
