//! Checks on JSON that the gateway runs before parsing it.

/// The deepest nesting of arrays and objects a request body or WebSocket frame may have.
/// No request of `API.md` nests deeper than a few levels.
pub const JSON_DEPTH_MAX: usize = 64;

/// Whether `bytes` nests arrays and objects no deeper than `max`, found in one pass
/// without parsing. serde_json skips ignored fields without its recursion limit, so
/// without this check a body with a million nested arrays in an unknown field is walked
/// whole. Brackets inside strings do not count; malformed JSON passes here and fails in
/// the parser.
pub fn depth_within(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// A body field that may be left out (with `#[serde(default)]`) but, when given, must be a
/// string: `null` is refused as a wrong type, as it was when the field was required.
pub fn given_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    <String as serde::Deserialize>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Depth counts arrays and objects, not brackets inside strings or after escapes.
    #[test]
    fn depth() {
        assert!(depth_within(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(!depth_within(br#"{"a":[1,{"b":2}]}"#, 2));
        assert!(depth_within(br#"{"a":"[[[[[[\"[["}"#, 1));
        assert!(depth_within(br#"{"a":"\\"}"#, 1));
        let deep = "[".repeat(65) + &"]".repeat(65);
        assert!(!depth_within(deep.as_bytes(), JSON_DEPTH_MAX));
        let ok = "[".repeat(64) + &"]".repeat(64);
        assert!(depth_within(ok.as_bytes(), JSON_DEPTH_MAX));
    }
}
