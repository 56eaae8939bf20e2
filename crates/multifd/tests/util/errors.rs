//! How the tests print and classify the engine's errors.

use multifd::Error;

/// The error with its causes, as the CLI prints it (`a: b: c`): what a
/// user reads, so what message assertions check.
pub fn message(e: &Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Short description of an error variant (its name), for tallies.
pub fn variant(e: &Error) -> String {
    let s = format!("{e:?}");
    s.split([' ', '{', '(']).next().unwrap_or("").to_owned()
}
