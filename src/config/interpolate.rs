//! `${VAR}` and `${VAR:-default}` interpolation from the environment.
//!
//! Interpolation works on the raw text, line by line, before YAML parsing, so
//! line numbers in later errors stay exact. `$${` is an escaped literal `${`.
//! Lines whose first non-blank character is `#` (comments) are left alone.

/// Replaces every `${...}` reference. `lookup` returns the variable's value.
/// Errors carry the 1-based line and column of the reference.
pub fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, (usize, usize, String)> {
    let mut out = String::with_capacity(text.len());
    for (lineno, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') || !line.contains('$') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        let mut col = 1;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos..];
            if let Some(tail) = after.strip_prefix("$${") {
                out.push_str("${");
                rest = tail;
                col += pos + 3;
                continue;
            }
            if !after.starts_with("${") {
                out.push('$');
                rest = &after[1..];
                col += pos + 1;
                continue;
            }
            let close = after.find('}').ok_or_else(|| {
                (
                    lineno + 1,
                    col + pos,
                    "unterminated `${`: missing `}`".to_string(),
                )
            })?;
            let inner = &after[2..close];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err((
                    lineno + 1,
                    col + pos,
                    format!("`${{{inner}}}` is not a valid variable reference (use ${{NAME}} or ${{NAME:-default}})"),
                ));
            }
            match (lookup(name), default) {
                (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err((
                        lineno + 1,
                        col + pos,
                        format!("environment variable `{name}` is not set (give a default with ${{{name}:-value}})"),
                    ))
                }
            }
            col += pos + close + 1;
            rest = &after[close + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("10.0.0.1".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn replaces_and_defaults() {
        let s = interpolate("a: ${HOST}:${PORT:-8080}\nb: $${HOST} $5\n", env).unwrap();
        assert_eq!(s, "a: 10.0.0.1:8080\nb: ${HOST} $5\n");
        assert_eq!(interpolate("x: ${EMPTY:-d}", env).unwrap(), "x: d");
        assert_eq!(interpolate("x: '${EMPTY}'", env).unwrap(), "x: ''");
    }

    #[test]
    fn comments_untouched() {
        assert_eq!(interpolate("  # ${NOPE}\n", env).unwrap(), "  # ${NOPE}\n");
    }

    #[test]
    fn missing_variable_reports_position() {
        let (line, col, msg) = interpolate("a: 1\nb: x${NOPE}\n", env).unwrap_err();
        assert_eq!((line, col), (2, 5));
        assert!(msg.contains("NOPE"), "{msg}");
        let (line, _, msg) = interpolate("a: ${BAD-NAME}", env).unwrap_err();
        assert_eq!(line, 1);
        assert!(msg.contains("not a valid"));
        assert!(interpolate("a: ${OPEN", env)
            .unwrap_err()
            .2
            .contains("unterminated"));
    }
}
