//! Python apps: `gantry run FILE.py[::FUNCTION] [ARGS…]`, `gantry deploy FILE.py [ARGS…]`
//! and `gantry serve FILE.py [ARGS…]` are the Python SDK's (`sdk/python`, the `gantry`
//! module). The CLI hands them over before parsing its own flags by replacing itself with
//! `$GANTRY_PYTHON -m gantry COMMAND ARGS…` (`python3` by default); the SDK finds the
//! coordinator in the same configuration as the CLI.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;

/// The variable naming the Python interpreter that runs the SDK.
pub const PYTHON_VAR: &str = "GANTRY_PYTHON";

/// The commands the SDK takes for a `.py` file.
const COMMANDS: [&str; 3] = ["run", "deploy", "serve"];

/// The SDK's arguments (`-m gantry COMMAND FILE ARGS…`) when `argv` (the CLI's own, the
/// program first) is a Python app's `run`, `deploy` or `serve`: the command is the first
/// argument and the second ends with `.py` or holds `.py::`.
pub fn handoff(argv: &[OsString]) -> Option<Vec<OsString>> {
    let command = argv.get(1)?.to_str()?;
    let file = argv.get(2)?.to_string_lossy();
    if !COMMANDS.contains(&command) || !(file.ends_with(".py") || file.contains(".py::")) {
        return None;
    }
    let mut args: Vec<OsString> = vec!["-m".into(), "gantry".into()];
    args.extend(argv[1..].iter().cloned());
    Some(args)
}

/// Replaces this process with the SDK; returns only when that could not be done, with
/// what to tell the user.
pub fn exec(python: Option<OsString>, args: Vec<OsString>) -> String {
    let python = python
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into());
    let e = std::process::Command::new(&python).args(&args).exec();
    format!(
        "cannot run the Python SDK with `{}` ({PYTHON_VAR}): {e}; install Python 3.9 or \
         newer with the SDK (`pip install ./sdk/python`), or set {PYTHON_VAR} to an \
         interpreter that has it",
        OsStr::new(&python).to_string_lossy()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("gantry")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn only_python_files_of_run_deploy_and_serve_are_handed_over() {
        let to_sdk = |args: &[&str]| {
            handoff(&argv(args)).map(|a| {
                a.iter()
                    .map(|s| s.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            to_sdk(&["run", "app.py::f", "x"]),
            Some(vec![
                "-m".into(),
                "gantry".into(),
                "run".into(),
                "app.py::f".into(),
                "x".into()
            ])
        );
        assert!(to_sdk(&["deploy", "dir/app.py"]).is_some());
        assert!(to_sdk(&["serve", "app.py", "--flag"]).is_some());
        assert_eq!(to_sdk(&["run", "--image", "busybox"]), None);
        assert_eq!(to_sdk(&["deploy", "-f", "gantry.toml"]), None);
        assert_eq!(to_sdk(&["deploy"]), None);
        assert_eq!(to_sdk(&["call", "app.py"]), None);
        assert_eq!(to_sdk(&["run", "app.pyc"]), None);
        assert_eq!(to_sdk(&[]), None);
    }
}
