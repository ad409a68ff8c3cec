//! Errors as people read them: a typed error and its `source()` chain on
//! one line.

use std::error::Error;

/// An error and its causes on one line, `a: b: c`, less any cause whose
/// text the line already holds (library errors that name their cause in
/// their own message).
pub fn one_line(error: &(dyn Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(error);
    while let Some(error) = cause {
        let text = error.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = error.source();
    }
    line
}

/// A third-party error kept as a cause (tract's are `anyhow` errors, which
/// are not `std::error::Error` themselves).
pub type Cause = Box<dyn Error + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_joins_the_causes_and_skips_repeats() {
        #[derive(Debug, thiserror::Error)]
        #[error("/m.onnx: cannot read")]
        struct Read(#[source] std::io::Error);
        let read = Read(std::io::Error::other("disk on fire"));
        assert_eq!(one_line(&read), "/m.onnx: cannot read: disk on fire");
        // A library error that names its cause in its own text.
        #[derive(Debug, thiserror::Error)]
        #[error("cannot load: {0}")]
        struct Verbose(#[source] std::io::Error);
        let verbose = Verbose(std::io::Error::other("truncated"));
        assert_eq!(one_line(&verbose), "cannot load: truncated");
    }
}
