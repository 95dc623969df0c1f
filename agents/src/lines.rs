//! Reading lines with a cap: a line longer than the cap is passed over without being buffered,
//! and a last line without its newline is reported as partial (the writer may still be on it).

use std::io::{self, BufRead};

/// What [`next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LineRead {
    /// A complete line is in the buffer, without its `\n`; `consumed` counts the `\n`.
    Line { consumed: u64 },
    /// A complete line longer than the cap was passed over; `consumed` counts the `\n`. The
    /// buffer holds the line's last [`TAIL_KEEP`] bytes (what a cursor's tail check needs).
    TooLong { consumed: u64 },
    /// The input ended inside a line (no `\n` yet). Nothing of it is to be used.
    Partial,
    /// The input ended at a line boundary.
    Eof,
}

/// How many of a too-long line's last bytes [`next_line`] keeps.
pub(crate) const TAIL_KEEP: usize = 1024;

/// Reads the next line of `input` into `buf` (cleared first), with at most `max` bytes.
pub(crate) fn next_line(input: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<LineRead> {
    buf.clear();
    if buf.capacity() > 4 * 1024 * 1024 {
        // Do not hold on to a big line's memory for the rest of the file.
        buf.shrink_to(64 * 1024);
    }
    let mut consumed = 0u64;
    let mut too_long = false;
    loop {
        let available = match input.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if consumed == 0 { LineRead::Eof } else { LineRead::Partial });
        }
        let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], true),
            None => (available, false),
        };
        if !too_long && buf.len() + chunk.len() > max {
            too_long = true;
            let keep = buf.len().saturating_sub(TAIL_KEEP);
            buf.drain(..keep);
            buf.shrink_to(64 * 1024);
        }
        buf.extend_from_slice(chunk);
        if too_long && buf.len() > TAIL_KEEP {
            let drop = buf.len() - TAIL_KEEP;
            buf.drain(..drop);
        }
        let used = chunk.len() + usize::from(found);
        input.consume(used);
        consumed += used as u64;
        if found {
            return Ok(if too_long { LineRead::TooLong { consumed } } else { LineRead::Line { consumed } });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_caps_and_partial_lines() {
        let data = b"one\n\ntoo long line\nlast".to_vec();
        let mut input = io::BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        assert_eq!(next_line(&mut input, &mut buf, 8).unwrap(), LineRead::Line { consumed: 4 });
        assert_eq!(buf, b"one");
        assert_eq!(next_line(&mut input, &mut buf, 8).unwrap(), LineRead::Line { consumed: 1 });
        assert_eq!(buf, b"");
        assert_eq!(next_line(&mut input, &mut buf, 8).unwrap(), LineRead::TooLong { consumed: 14 });
        assert_eq!(buf, b"too long line", "the tail of a long line is kept");
        let long = [vec![b'a'; 5000], b"\n".to_vec()].concat();
        assert_eq!(next_line(&mut &long[..], &mut buf, 8).unwrap(), LineRead::TooLong { consumed: 5001 });
        assert_eq!(buf.len(), TAIL_KEEP);
        assert_eq!(next_line(&mut input, &mut buf, 8).unwrap(), LineRead::Partial);
        let mut done = &b"x\n"[..];
        assert_eq!(next_line(&mut done, &mut buf, 8).unwrap(), LineRead::Line { consumed: 2 });
        assert_eq!(next_line(&mut done, &mut buf, 8).unwrap(), LineRead::Eof);
    }
}
