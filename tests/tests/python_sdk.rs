//! The Python SDK's own tests (sdk/python/tests, pytest), run here so that the README's
//! one test command runs them too: the in-container runtime against a fake runtime API,
//! the package's install, and the SDK against `gantry dev` with real containers (calls,
//! maps, classes, retries, errors, a web endpoint, a schedule, a volume and a secret, an
//! image from the builder, `gantry run FILE.py`). GANTRY_TEST_PYTHON names the
//! interpreter (default `python3`); it needs pytest (`.ci/run` installs it).

use std::path::PathBuf;
use std::process::Command;

use gantry_tests::binary;

#[test]
fn the_python_sdk_passes_its_tests() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned();
    let python = std::env::var("GANTRY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_pytest = Command::new(&python)
        .args(["-m", "pytest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_pytest,
        "`{python} -m pytest` does not run: install pytest (`{python} -m pip install pytest`) \
         or set GANTRY_TEST_PYTHON to an interpreter that has it"
    );
    let status = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--durations=5",
        ])
        .arg(repo.join("sdk/python/tests"))
        .current_dir(&repo)
        .env("GANTRY_BIN", binary("gantry"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .status()
        .expect("running pytest");
    assert!(
        status.success(),
        "the Python SDK's tests failed (output above)"
    );
}
