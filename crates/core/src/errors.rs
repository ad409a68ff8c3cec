//! Errors as people read them: a typed error and its `source()` chain on
//! one line.

use std::error::Error;

/// An error and its causes on one line, `a: b: c`, less any cause whose
/// text the line already holds (library errors that name their cause in
/// their own message), and less a context that the next cause repeats at
/// its start (`/m.onnx` over `/m.onnx: not a model`).
pub fn one_line(error: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause = Some(error);
    while let Some(error) = cause {
        let text = error.to_string();
        let repeats_last = parts.last().is_some_and(|last| {
            text.strip_prefix(last.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(": "))
        });
        if repeats_last {
            parts.pop();
            parts.push(text);
        } else if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        cause = error.source();
    }
    parts.join(": ")
}

/// A third-party error kept as a cause (tract's are `anyhow` errors, which
/// are not `std::error::Error` themselves).
pub type Cause = Box<dyn Error + Send + Sync>;

/// An error and what nanodetd was doing when it came: a third-party error
/// given the context a reader needs, with the error kept as the cause.
#[derive(Debug, thiserror::Error)]
#[error("{doing}: {source}")]
pub struct While {
    /// What nanodetd was doing ("binding the outputs").
    pub doing: String,
    /// The error.
    #[source]
    pub source: Cause,
}

impl While {
    /// `source`, met while `doing`.
    pub fn new(doing: impl Into<String>, source: impl Into<Cause>) -> While {
        While {
            doing: doing.into(),
            source: source.into(),
        }
    }
}

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
        // A context that its cause spells out again.
        #[derive(Debug, thiserror::Error)]
        #[error("/m.onnx")]
        struct Model(#[source] Read);
        let model = Model(Read(std::io::Error::other("disk on fire")));
        assert_eq!(one_line(&model), "/m.onnx: cannot read: disk on fire");
        // Only a whole context: a longer name is a different file.
        #[derive(Debug, thiserror::Error)]
        #[error("/m")]
        struct Short(#[source] Model);
        let short = Short(Model(Read(std::io::Error::other("disk on fire"))));
        assert_eq!(one_line(&short), "/m: /m.onnx: cannot read: disk on fire");
    }
}
