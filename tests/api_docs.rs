//! docs/rhai-api.md is exactly what `lcasr api-docs` prints, so the checked-in
//! API reference can never go stale.

#[test]
fn rhai_api_reference_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/rhai-api.md");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = lcasr::script::docs::api_markdown();
    assert!(
        checked_in == generated,
        "docs/rhai-api.md is stale: regenerate it with `cargo run -- api-docs > docs/rhai-api.md`"
    );
    // Every registered function is documented.
    let undocumented: Vec<&str> = generated
        .lines()
        .zip(generated.lines().skip(1))
        .filter(|(a, b)| a.starts_with("- `") && !b.starts_with("  "))
        .map(|(a, _)| a)
        .collect();
    assert!(
        undocumented.is_empty(),
        "functions without doc comments: {undocumented:?}"
    );
}
