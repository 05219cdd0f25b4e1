//! The production crates take berth-testkit as a dev-dependency only.

use std::path::Path;

/// The `[section]` of each line of `manifest` that names `berth-testkit`.
fn sections_naming_testkit(manifest: &str) -> Vec<String> {
    let mut section = String::new();
    let mut found = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_owned();
        } else if line.starts_with("berth-testkit") {
            found.push(section.clone());
        }
    }
    found
}

#[test]
fn production_crates_depend_on_testkit_only_for_their_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (manifest, allowed) in [
        (
            "Cargo.toml",
            &["[workspace.dependencies]", "[dev-dependencies]"][..],
        ),
        ("actors/Cargo.toml", &["[dev-dependencies]"][..]),
        ("cluster/Cargo.toml", &["[dev-dependencies]"][..]),
    ] {
        let text = std::fs::read_to_string(root.join(manifest)).unwrap();
        for section in sections_naming_testkit(&text) {
            assert!(
                allowed.contains(&section.as_str()),
                "{manifest} names berth-testkit in {section}: production code must not depend on it"
            );
        }
    }
    assert_eq!(
        sections_naming_testkit("[dependencies]\nberth-testkit.workspace = true\n"),
        ["[dependencies]"]
    );
}
