//! Configuration text → parse (interpolation, YAML, position index) →
//! compile. Any input must give a config or located errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `${A}` resolves, anything else is unset: both paths of interpolation.
    let env = |name: &str| (name == "A").then(|| "127.0.0.1:8080".to_string());
    let loaded = match portico::config::parse_str("fuzz.yaml", text, env) {
        Ok(l) => l,
        Err(e) => {
            // Errors must render.
            let _ = e.to_string();
            return;
        }
    };
    match portico::snapshot::compile(&loaded, None) {
        Ok(snap) => {
            // A compiled snapshot also compiles as a reload of itself.
            let _ = portico::snapshot::compile(&loaded, Some(&snap));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
