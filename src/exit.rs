//! The exit statuses of the `flowgate` command, every subcommand alike.
//!
//! [`Exit`] is the one table: the binary returns its values, `--help` and
//! the man page print [`Exit::help_text`], and the README's table is
//! [`Exit::readme_table`] (checked by `tests/cli.rs`).

use std::process::ExitCode;

/// How a `flowgate` command ended, as its process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Exit {
    /// Done (`ctl status`: the engine is ready; `run`: a clean shutdown).
    Ok,
    /// A runtime failure: the broker or the management API could not be
    /// reached or refused the request, the engine escalated (a supervisor's
    /// restart budget spent), or `ctl status` found the engine not ready.
    Failure,
    /// A usage error or an invalid configuration: nothing was attempted.
    /// (clap's own argument errors use the same status.)
    Usage,
}

impl Exit {
    /// Every status, in the order of their codes.
    pub const ALL: [Exit; 3] = [Exit::Ok, Exit::Failure, Exit::Usage];

    /// The process exit status.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
        }
    }

    /// One line for the tables.
    pub const fn meaning(self) -> &'static str {
        match self {
            Exit::Ok => "done (`ctl status`: ready; `run`: a clean shutdown)",
            Exit::Failure => {
                "runtime failure: broker or management API unreachable or refusing, \
                 the engine escalated, `ctl status` not ready"
            }
            Exit::Usage => "usage error or invalid configuration: nothing was attempted",
        }
    }

    /// The table shown after `--help` and in the man page.
    pub fn help_text() -> String {
        let mut s = String::from("Exit status:\n");
        for e in Self::ALL {
            s.push_str(&format!("  {}  {}\n", e.code(), e.meaning()));
        }
        s
    }

    /// The README's table (Markdown).
    pub fn readme_table() -> String {
        let mut s = String::from("| status | meaning |\n|---|---|\n");
        for e in Self::ALL {
            s.push_str(&format!("| {} | {} |\n", e.code(), e.meaning()));
        }
        s
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_in_order() {
        let codes: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes, [0, 1, 2]);
        assert!(Exit::help_text().contains("  2  usage error"));
    }
}
