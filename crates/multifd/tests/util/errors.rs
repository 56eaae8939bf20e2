//! How the tests print, classify and assert the engine's errors.

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

/// Asserts that an error matches a pattern (and its guard), printing the
/// context and the error otherwise:
/// `assert_err!(o.err, Error::Cancelled, "{t:?} {what}")`.
#[allow(unused_macros)] // not every test binary asserts errors
macro_rules! assert_err {
    ($err:expr, $pat:pat $(if $guard:expr)?, $($context:tt)+) => {{
        let err = &$err;
        assert!(
            matches!(err, $pat $(if $guard)?),
            "{}: {err:?}",
            format_args!($($context)+)
        );
    }};
}
#[allow(unused_imports)]
pub(crate) use assert_err;
