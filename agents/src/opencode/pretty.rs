//! JSON re-indented the way opencode writes its files (`JSON.stringify(value, null, 2)`),
//! keeping every token as it is (key order, number spelling, string escapes).

/// Re-indents valid JSON text with two spaces, `"key": value`, and `{}`/`[]` for empty ones.
pub fn pretty_json(compact: &str) -> String {
    let bytes = compact.as_bytes();
    let mut out = String::with_capacity(compact.len() + compact.len() / 4);
    let mut depth = 0usize;
    let mut i = 0;
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        for _ in 0..depth {
            out.push_str("  ");
        }
    };
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'"' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(bytes.len());
                out.push_str(&compact[start..i]);
                continue;
            }
            b'{' | b'[' => {
                let close = if c == b'{' { b'}' } else { b']' };
                let mut j = i + 1;
                while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                    j += 1;
                }
                out.push(c as char);
                if j < bytes.len() && bytes[j] == close {
                    out.push(close as char);
                    i = j + 1;
                    continue;
                }
                depth += 1;
                newline(&mut out, depth);
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c as char);
            }
            b',' => {
                out.push(',');
                newline(&mut out, depth);
            }
            b':' => out.push_str(": "),
            b' ' | b'\t' | b'\n' | b'\r' => {}
            _ => {
                // A number, true, false or null: copy up to the next structural character.
                let start = i;
                while i < bytes.len() && !b",:{}[]\" \t\n\r".contains(&bytes[i]) {
                    i += 1;
                }
                out.push_str(&compact[start..i]);
                continue;
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_json_stringify_with_two_spaces() {
        let compact = r#"{"id":"a","n":[1,2.50,{}],"e":[],"s":"x\"y,{z}:","o":{"t":true,"f":null}}"#;
        let expected = "{\n  \"id\": \"a\",\n  \"n\": [\n    1,\n    2.50,\n    {}\n  ],\n  \"e\": [],\n  \"s\": \"x\\\"y,{z}:\",\n  \"o\": {\n    \"t\": true,\n    \"f\": null\n  }\n}";
        assert_eq!(pretty_json(compact), expected);
        assert_eq!(pretty_json(&pretty_json(compact)), expected, "idempotent");
        let back: serde_json::Value = serde_json::from_str(&pretty_json(compact)).unwrap();
        assert_eq!(back, serde_json::from_str::<serde_json::Value>(compact).unwrap());
    }
}
