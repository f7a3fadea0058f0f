//! The AWS SDK is configured without its default features so that the build holds one
//! TLS stack and one HTTP client: one rustls (with aws-lc-rs, as the rest of blockferry)
//! and one hyper. A dependency update that brings a second one fails here.

#[test]
fn one_rustls_and_one_hyper_in_the_whole_build() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
        .expect("the workspace's Cargo.lock");
    let versions = |name: &str| -> Vec<String> {
        let header = format!("name = \"{name}\"");
        let lines: Vec<&str> = lock.lines().collect();
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| **l == header)
            .filter_map(|(i, _)| lines.get(i + 1))
            .map(|l| {
                l.trim_start_matches("version = ")
                    .trim_matches('"')
                    .to_owned()
            })
            .collect()
    };
    for name in ["rustls", "hyper", "tokio-rustls", "hyper-rustls", "h2"] {
        let found = versions(name);
        assert!(found.len() <= 1, "{name} in several versions: {found:?}");
    }
    assert_eq!(versions("rustls").len(), 1);
}
