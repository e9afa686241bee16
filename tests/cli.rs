//! The `flowgate` command line as operators use it: `check` on the shipped and
//! on broken configs (exact `FILE:LINE:COL: key.path: message` lines, FILE as
//! given), `run` refusing an invalid config, `FLOWGATE_CONFIG`, and exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FLOWGATE: &str = env!("CARGO_BIN_EXE_flowgate");

/// `flowgate ARGS` in `dir`, without a `FLOWGATE_CONFIG` from the environment.
fn flowgate(dir: &Path, args: &[&str]) -> Output {
    Command::new(FLOWGATE)
        .args(args)
        .current_dir(dir)
        .env_remove("FLOWGATE_CONFIG")
        .output()
        .expect("run flowgate")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A temp dir holding `name` with `text`.
fn config_dir(name: &str, text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("config subdir");
    std::fs::write(path, text).expect("write config");
    dir
}

/// Runs `flowgate check --config FILE` in `dir` and asserts exit 1 with exactly
/// `lines` on stderr.
fn assert_check_fails(dir: &Path, file: &str, lines: &[String]) {
    let output = flowgate(dir, &["check", "--config", file]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "check {file}: stderr:\n{}",
        stderr(&output)
    );
    assert_eq!(stderr(&output), lines.join("\n") + "\n", "check {file}");
}

fn shipped_configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let main = root.join("flowgate.toml");
    assert!(main.is_file(), "{} is missing", main.display());
    let mut configs = vec![main];
    let examples = std::fs::read_dir(root.join("examples")).expect("config/examples");
    let mut examples: Vec<PathBuf> = examples
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    examples.sort();
    configs.extend(examples);
    configs
}

#[test]
fn check_accepts_every_shipped_config() {
    for config in shipped_configs() {
        let path = config.to_str().expect("utf-8 path");
        let output = flowgate(
            Path::new(env!("CARGO_MANIFEST_DIR")),
            &["check", "--config", path],
        );
        assert_eq!(
            output.status.code(),
            Some(0),
            "check {path}: stderr:\n{}",
            stderr(&output)
        );
    }
}

/// The contract's example problem, at the very line and column it names.
const BAD_ADDRESS: &str = r#"# three engines behind one frontend
[global]
grace_period = "30s"

[frontends.public]
bind = ["127.0.0.1:0"]
backend = "engines"

[frontends.public.timeouts]
client_idle = "60s"
request_header = "10s"

[backends.engines]
balance = "round_robin"
retries = 2

[backends.engines.timeouts]
connect = "3s"
response = "60s"

[[backends.engines.servers]]
name = "engine-1"
address = "10.0.0.11:7233"

[[backends.engines.servers]]
name = "engine-2"
address = "10.0.0.12:7233"

[[backends.engines.servers]]
name = "engine-3"
address = "10.0.0.300:80"
"#;

#[test]
fn check_reports_a_bad_address_as_in_the_contract() {
    let dir = config_dir("flowgate.toml", BAD_ADDRESS);
    let problem = r#"backends.engines.servers[2].address: invalid socket address "10.0.0.300:80""#;
    assert_check_fails(
        dir.path(),
        "flowgate.toml",
        &[format!("flowgate.toml:31:11: {problem}")],
    );
    // FILE is the path exactly as given.
    assert_check_fails(
        dir.path(),
        "./flowgate.toml",
        &[format!("./flowgate.toml:31:11: {problem}")],
    );
    let absolute = dir.path().join("flowgate.toml");
    let absolute = absolute.to_str().expect("utf-8 path");
    assert_check_fails(
        Path::new("/"),
        absolute,
        &[format!("{absolute}:31:11: {problem}")],
    );
}

#[test]
fn check_reports_an_unknown_key_with_a_suggestion() {
    let dir = config_dir(
        "conf/typo.toml",
        r#"[global]
grace_perod = "5s"

[frontends.web]
bind = ["127.0.0.1:0"]
backend = "engines"

[backends.engines]
[[backends.engines.servers]]
address = "127.0.0.1:7233"
"#,
    );
    assert_check_fails(
        dir.path(),
        "conf/typo.toml",
        &[r#"conf/typo.toml:2:1: global: unknown key "grace_perod" (did you mean "grace_period"?)"#
            .to_string()],
    );
}

#[test]
fn check_reports_missing_and_unknown_backends() {
    let dir = config_dir(
        "backend.toml",
        r#"[frontends.web]
bind = ["127.0.0.1:0"]
backend = "engnes"

[frontends.other]
bind = ["127.0.0.1:0"]

[backends.engines]
[[backends.engines.servers]]
address = "127.0.0.1:7233"
"#,
    );
    assert_check_fails(
        dir.path(),
        "backend.toml",
        &[
            r#"backend.toml:3:11: frontends.web.backend: unknown backend "engnes" (did you mean "engines"?)"#.to_string(),
            "backend.toml:5:1: frontends.other.backend: missing required key".to_string(),
        ],
    );
}

#[test]
fn check_reports_duplicate_server_names() {
    let dir = config_dir(
        "dup.toml",
        r#"[frontends.web]
bind = ["127.0.0.1:0"]
backend = "engines"

[backends.engines]
[[backends.engines.servers]]
name = "engine-1"
address = "127.0.0.1:7233"

[[backends.engines.servers]]
name = "engine-1"
address = "127.0.0.1:7234"

[[backends.engines.servers]]
address = "127.0.0.1:7235"

[[backends.engines.servers]]
address = "127.0.0.1:7235"
"#,
    );
    assert_check_fails(
        dir.path(),
        "dup.toml",
        &[
            r#"dup.toml:11:8: backends.engines.servers[1].name: duplicate server name "engine-1""#.to_string(),
            r#"dup.toml:18:11: backends.engines.servers[3].address: duplicate server name "127.0.0.1:7235" (a server's name defaults to its address)"#.to_string(),
        ],
    );
}

const VALID: &str = r#"[frontends.web]
bind = ["127.0.0.1:0"]
backend = "engines"

[backends.engines]
[[backends.engines.servers]]
address = "127.0.0.1:7233"
"#;

/// A cross-check problem early in the file and a value problem later: both are
/// reported, in file order.
const TWO_PROBLEMS: &str = r#"[frontends.web]
bind = ["127.0.0.1:0"]
backend = "engnes"

[backends.engines]
[[backends.engines.servers]]
address = "127.0.0.1:7233"
weight = 300
"#;

fn two_problem_lines(file: &str) -> Vec<String> {
    vec![
        format!(
            r#"{file}:3:11: frontends.web.backend: unknown backend "engnes" (did you mean "engines"?)"#
        ),
        format!(
            "{file}:8:10: backends.engines.servers[0].weight: must be between 0 and 256, got 300"
        ),
    ]
}

#[test]
fn check_reports_every_problem_in_file_order() {
    let dir = config_dir("two.toml", TWO_PROBLEMS);
    assert_check_fails(dir.path(), "two.toml", &two_problem_lines("two.toml"));
}

#[test]
fn check_reports_an_unreadable_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = flowgate(dir.path(), &["check", "--config", "absent.toml"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).starts_with("absent.toml: "),
        "stderr: {}",
        stderr(&output)
    );
}

#[test]
fn check_binds_nothing() {
    // The address is taken: `check` must not care, `run` would fail to bind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = config_dir(
        "taken.toml",
        &format!(
            "[frontends.web]\nbind = [\"{addr}\"]\nbackend = \"engines\"\n\n\
             [backends.engines]\n[[backends.engines.servers]]\naddress = \"127.0.0.1:7233\"\n"
        ),
    );
    let output = flowgate(dir.path(), &["check", "--config", "taken.toml"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr:\n{}",
        stderr(&output)
    );
}

#[test]
fn run_exits_1_when_it_cannot_listen() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = config_dir(
        "taken.toml",
        &format!(
            "[frontends.web]\nbind = [\"{addr}\"]\nbackend = \"engines\"\n\n\
             [backends.engines]\n[[backends.engines.servers]]\naddress = \"127.0.0.1:7233\"\n"
        ),
    );
    let output = flowgate(dir.path(), &["run", "--config", "taken.toml"]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "stderr:\n{}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains(&format!("frontends.web: cannot listen on {addr}")),
        "stderr:\n{}",
        stderr(&output)
    );
}

#[test]
fn run_refuses_an_invalid_config_with_the_same_lines() {
    let dir = config_dir("two.toml", TWO_PROBLEMS);
    let output = flowgate(dir.path(), &["run", "--config", "two.toml"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        two_problem_lines("two.toml").join("\n") + "\n"
    );
}

#[test]
fn flowgate_config_stands_in_for_the_flag() {
    let dir = config_dir("two.toml", TWO_PROBLEMS);
    for command in ["check", "run"] {
        let output = Command::new(FLOWGATE)
            .arg(command)
            .current_dir(dir.path())
            .env("FLOWGATE_CONFIG", "two.toml")
            .output()
            .expect("run flowgate");
        assert_eq!(output.status.code(), Some(1), "{command}");
        assert_eq!(
            stderr(&output),
            two_problem_lines("two.toml").join("\n") + "\n",
            "{command}"
        );
    }

    let dir = config_dir("valid.toml", VALID);
    let output = Command::new(FLOWGATE)
        .arg("check")
        .current_dir(dir.path())
        .env("FLOWGATE_CONFIG", "valid.toml")
        .output()
        .expect("run flowgate");
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr:\n{}",
        stderr(&output)
    );
}

#[test]
fn usage_errors_exit_2() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for args in [
        &["--bogus"][..],
        &[],
        &["run"],
        &["check"],
        &["check", "--config"],
        &["frobnicate"],
    ] {
        let output = flowgate(here, args);
        assert_eq!(output.status.code(), Some(2), "flowgate {args:?}");
        let text = stderr(&output);
        assert!(
            text.contains("Usage:") || text.contains("--help"),
            "flowgate {args:?}: stderr:\n{text}"
        );
    }
}

#[test]
fn version_and_help_exit_0() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = flowgate(here, &["--version"]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        stdout(&output).trim(),
        format!("flowgate {}", env!("CARGO_PKG_VERSION"))
    );

    let output = flowgate(here, &["--help"]);
    assert_eq!(output.status.code(), Some(0));
    let help = stdout(&output);
    for command in ["run", "check", "demo"] {
        assert!(help.contains(command), "--help lacks {command}:\n{help}");
    }
}
