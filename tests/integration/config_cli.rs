//! The real `portico` binary: `validate` on good and bad files (each error
//! located as file:line:column, key path and reason), environment
//! interpolation, `--version`, and the bundled quickstart example.

use std::path::PathBuf;
use std::process::Command;

/// A valid config. Tests break one line of it, so the line numbers of the
/// errors are known (line N is `BASE.lines().nth(N - 1)`).
const BASE: &str = r#"listeners:
  - name: main
    address: 127.0.0.1:0
upstreams:
  - name: users
    targets:
      - address: 127.0.0.1:9001
    timeouts:
      connect: 2s
routes:
  - name: health
    match:
      path: /healthz
    action:
      respond: {status: 200, body: ok}
  - name: users
    match:
      path: /users/{id}
      headers:
        - {name: x-v, regex: "^[0-9]+$"}
    action:
      proxy:
        upstream: users
"#;

/// Variables the tests set; removed from the child's environment otherwise.
const VARS: &[&str] = &["PORTICO_T_ADDR", "PORTICO_T_TARGET", "PORTICO_LISTEN"];

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn portico(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portico"));
    cmd.args(args);
    for v in VARS {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run portico");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes `yaml` to a file named `name` in a fresh directory of this test.
fn write(name: &str, yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "portico-config-cli-{}-{}",
        std::process::id(),
        name.trim_end_matches(".yaml")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

fn validate(name: &str, yaml: &str, env: &[(&str, &str)]) -> (PathBuf, Run) {
    let path = write(name, yaml);
    let run = portico(&["validate", "--config", path.to_str().unwrap()], env);
    (path, run)
}

/// `BASE` with line `n` (1-based) replaced by `text`.
fn with_line(n: usize, text: &str) -> String {
    let mut lines: Vec<&str> = BASE.lines().collect();
    lines[n - 1] = text;
    lines.join("\n") + "\n"
}

/// 1-based column where `needle` starts in `line`.
fn col(line: &str, needle: &str) -> usize {
    line.find(needle)
        .unwrap_or_else(|| panic!("`{needle}` not in `{line}`"))
        + 1
}

/// Validates `BASE` with line `n` replaced and checks the single reported
/// error: `FILE:n:column: key_path: ...reason...`, and a failing exit status.
fn assert_located_error(n: usize, text: &str, column: usize, key_path: &str, reasons: &[&str]) {
    let (path, run) = validate(&format!("line{n}.yaml"), &with_line(n, text), &[]);
    assert_eq!(run.code, Some(1), "exit status; stderr: {}", run.stderr);
    let first = run.stderr.lines().next().unwrap_or("");
    let want = format!("{}:{n}:{column}: {key_path}: ", path.display());
    assert!(
        first.starts_with(&want),
        "expected `{want}...`, got:\n{}",
        run.stderr
    );
    for r in reasons {
        assert!(
            run.stderr.contains(r),
            "reason `{r}` missing:\n{}",
            run.stderr
        );
    }
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

#[test]
fn a_valid_config_validates() {
    let (path, run) = validate("valid.yaml", BASE, &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains(&path.display().to_string()),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("OK"), "{}", run.stdout);
}

#[test]
fn unknown_key_is_an_error_at_its_line() {
    let line = "      pth: /healthz";
    assert_located_error(
        13,
        line,
        col(line, "pth"),
        "routes[0].match.pth",
        &["unknown field `pth`", "path_prefix"],
    );
}

#[test]
fn bad_duration_is_an_error_at_its_line() {
    let line = "      connect: 2x";
    assert_located_error(
        9,
        line,
        col(line, "2x"),
        "upstreams[0].timeouts.connect",
        &["2x", "unit"],
    );
}

#[test]
fn undefined_upstream_reference_is_an_error_at_its_line() {
    let line = "        upstream: userz";
    assert_located_error(
        23,
        line,
        col(line, "upstream"),
        "routes[1].action.proxy.upstream",
        &["no upstream is named `userz`", "users"],
    );
}

#[test]
fn duplicate_route_name_is_an_error_at_its_line() {
    let line = "  - name: health";
    assert_located_error(
        16,
        line,
        col(line, "name"),
        "routes[1].name",
        &["duplicate route name `health`"],
    );
}

#[test]
fn bad_path_template_is_an_error_at_its_line() {
    let line = "      path: /users/{id";
    assert_located_error(
        18,
        line,
        col(line, "path"),
        "routes[1].match.path",
        &["{id", "whole segment"],
    );
    let line = "      path: \"/files/{*rest}/x\"";
    assert_located_error(
        18,
        line,
        col(line, "path"),
        "routes[1].match.path",
        &["must be the last segment"],
    );
}

#[test]
fn invalid_regex_is_an_error_at_its_line() {
    let line = "        - {name: x-v, regex: \"[0-9\"}";
    assert_located_error(
        20,
        line,
        col(line, "regex"),
        "routes[1].match.headers[0].regex",
        &["invalid regex", "unclosed character class"],
    );
}

#[test]
fn missing_env_var_without_default_is_an_error_at_its_reference() {
    let line = "    address: ${PORTICO_T_ADDR}";
    assert_located_error(
        3,
        line,
        col(line, "${"),
        "listeners[0].address",
        &["PORTICO_T_ADDR", "not set"],
    );
}

#[test]
fn every_semantic_error_is_reported_not_just_the_first() {
    let yaml = BASE
        .replace("      path: /users/{id}", "      path: users")
        .replace("        upstream: users", "        upstream: nope");
    let (path, run) = validate("many.yaml", &yaml, &[]);
    assert_eq!(run.code, Some(1));
    let file = path.display().to_string();
    assert!(
        run.stderr
            .contains(&format!("{file}:18:7: routes[1].match.path: ")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains(&format!("{file}:23:9: routes[1].action.proxy.upstream: ")),
        "{}",
        run.stderr
    );
}

#[test]
fn unreadable_file_is_an_error() {
    let missing = std::env::temp_dir().join("portico-config-cli-does-not-exist.yaml");
    let run = portico(&["validate", "--config", missing.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("cannot read"), "{}", run.stderr);
}

#[test]
fn env_interpolation_with_and_without_defaults() {
    // The default is used when the variable is unset, the value when set;
    // an invalid default shows which one was used.
    let yaml = BASE
        .replace(
            "    address: 127.0.0.1:0",
            "    address: ${PORTICO_T_ADDR:-not-an-address}",
        )
        .replace(
            "      - address: 127.0.0.1:9001",
            "      - address: \"${PORTICO_T_TARGET}\"",
        );
    let (path, run) = validate(
        "env.yaml",
        &yaml,
        &[
            ("PORTICO_T_ADDR", "127.0.0.1:0"),
            ("PORTICO_T_TARGET", "127.0.0.1:9009"),
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    let run = portico(
        &["validate", "--config", path.to_str().unwrap()],
        &[("PORTICO_T_TARGET", "127.0.0.1:9009")],
    );
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr
            .contains(":3:5: listeners[0].address: `not-an-address`"),
        "default not used: {}",
        run.stderr
    );

    let run = portico(
        &["validate", "--config", path.to_str().unwrap()],
        &[
            ("PORTICO_T_ADDR", "127.0.0.1:0"),
            ("PORTICO_T_TARGET", "no port here"),
        ],
    );
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr
            .contains(":7:9: upstreams[0].targets[0].address: `no port here`"),
        "value not used: {}",
        run.stderr
    );

    let run = portico(
        &["validate", "--config", path.to_str().unwrap()],
        &[("PORTICO_T_ADDR", "127.0.0.1:0")],
    );
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr
            .contains(":7:19: upstreams[0].targets[0].address: environment variable `PORTICO_T_TARGET` is not set"),
        "{}",
        run.stderr
    );
}

#[test]
fn version_flag_prints_the_version() {
    let run = portico(&["--version"], &[]);
    assert_eq!(run.code, Some(0));
    assert_eq!(
        run.stdout.trim(),
        format!("portico {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bundled_quickstart_example_validates() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.yaml");
    let run = portico(&["validate", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("OK"), "{}", run.stdout);
}

/// Every YAML example in the docs (other than the TLS guide, which needs
/// generated certificates: see `tls::tls_guide_examples_validate`) is a
/// complete configuration that validates. A block may be marked as a
/// fragment by starting with `# fragment`.
#[test]
fn documentation_examples_validate() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("portico-doc-examples-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Examples may name files under examples/ (JWKS, public keys), as they
    // would from the repository's root.
    let _ = std::os::unix::fs::symlink(root.join("examples"), dir.join("examples"));
    let mut checked = 0;
    for doc in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = doc.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".md") || name == "tls.md" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, block) in text.split("```yaml\n").skip(1).enumerate() {
            let yaml = block.split("\n```").next().unwrap();
            if yaml.starts_with("# fragment") {
                continue;
            }
            let file = dir.join(format!("{name}-{i}.yaml"));
            std::fs::write(&file, yaml).unwrap();
            if let Err(e) = portico::load(&file) {
                panic!("example {i} of docs/{name} does not validate:\n{e}\n{yaml}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} examples found");
    let _ = std::fs::remove_dir_all(&dir);
}
