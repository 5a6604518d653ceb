//! Turning stdin lines into records for `syncline produce`.

/// A line that cannot be a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// `--key-separator` was given but the line does not contain it.
    #[error("line {line_number} has no key separator {separator:?}")]
    MissingSeparator {
        /// 1-based line number.
        line_number: u64,
        /// The separator, for the message.
        separator: String,
    },
}

/// Removes the line ending: `\n`, or `\r\n`.
pub fn strip_line_ending(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Splits one line (without its ending) into key and value. Without a separator the whole line
/// is the value and the record has no key. With one, the line splits at its first occurrence:
/// `key<SEP>value` (either side may be empty; later occurrences belong to the value).
pub fn parse_line<'a>(
    line: &'a [u8],
    separator: Option<&[u8]>,
    line_number: u64,
) -> Result<(Option<&'a [u8]>, &'a [u8]), LineError> {
    let Some(separator) = separator else {
        return Ok((None, line));
    };
    match find(line, separator) {
        Some(position) => Ok((Some(&line[..position]), &line[position + separator.len()..])),
        None => Err(LineError::MissingSeparator {
            line_number,
            separator: String::from_utf8_lossy(separator).into_owned(),
        }),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return None;
    }
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_no_separator_option_the_whole_line_should_be_the_value() {
        assert_eq!(
            parse_line(b"a:b", None, 1).unwrap(),
            (None, b"a:b".as_slice())
        );
        assert_eq!(parse_line(b"", None, 1).unwrap(), (None, b"".as_slice()));
    }

    #[test]
    fn given_separator_should_split_at_its_first_occurrence() {
        assert_eq!(
            parse_line(b"user-1:{\"a\":1}", Some(b":"), 1).unwrap(),
            (Some(b"user-1".as_slice()), b"{\"a\":1}".as_slice())
        );
        assert_eq!(
            parse_line(b"k=>v=>w", Some(b"=>"), 1).unwrap(),
            (Some(b"k".as_slice()), b"v=>w".as_slice())
        );
        assert_eq!(
            parse_line(b"\tv", Some(b"\t"), 1).unwrap(),
            (Some(b"".as_slice()), b"v".as_slice())
        );
        assert_eq!(
            parse_line(b"k\t", Some(b"\t"), 1).unwrap(),
            (Some(b"k".as_slice()), b"".as_slice())
        );
    }

    #[test]
    fn given_line_without_separator_should_fail_naming_the_line_number() {
        let error = parse_line(b"no separator here", Some(b":"), 7).unwrap_err();
        assert_eq!(
            error,
            LineError::MissingSeparator {
                line_number: 7,
                separator: ":".into()
            }
        );
        assert_eq!(error.to_string(), "line 7 has no key separator \":\"");
    }

    #[test]
    fn line_endings_should_be_stripped_once() {
        assert_eq!(strip_line_ending(b"abc\n"), b"abc");
        assert_eq!(strip_line_ending(b"abc\r\n"), b"abc");
        assert_eq!(strip_line_ending(b"abc"), b"abc");
        assert_eq!(strip_line_ending(b"abc\n\n"), b"abc\n");
        assert_eq!(strip_line_ending(b"\n"), b"");
    }
}
