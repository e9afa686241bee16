//! The shipped systemd unit: `systemd-analyze verify` accepts it (when the tool
//! is installed), and it keeps what the notify protocol, reload and graceful
//! stop of flowgate need.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

const UNIT: &str = "systemd/flowgate.service";
const INSTALLED_BINARY: &str = "/usr/local/bin/flowgate";

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(UNIT);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The values of `key=` in the unit, in file order (comments skipped).
fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .collect()
}

fn value(text: &str, key: &str) -> String {
    let mut all = values(text, key);
    assert_eq!(all.len(), 1, "{key}= should be set once: {all:?}");
    all.remove(0)
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    // verify checks that ExecStart= is executable: point it at the binary
    // under test instead of the installed path.
    let text = unit_text();
    assert!(text.contains(INSTALLED_BINARY), "ExecStart moved?");
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("flowgate.service");
    std::fs::write(
        &unit,
        text.replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_flowgate")),
    )
    .expect("write unit");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "systemd-analyze verify:\n{stderr}");
    // Warnings about the unit come without a failing status.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("flowgate.service"))
        .collect();
    assert!(about_unit.is_empty(), "systemd-analyze verify:\n{stderr}");
}

#[test]
fn unit_runs_flowgate_as_a_notify_service_that_reloads_on_sighup() {
    let text = unit_text();
    assert_eq!(value(&text, "Type"), "notify");
    assert_eq!(
        value(&text, "ExecStart"),
        format!("{INSTALLED_BINARY} run --config /etc/flowgate/flowgate.toml")
    );
    assert_eq!(value(&text, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(value(&text, "Restart"), "on-failure");
    assert!(!value(&text, "WatchdogSec").is_empty());
    assert_eq!(value(&text, "ConfigurationDirectory"), "flowgate");
    assert_eq!(value(&text, "StateDirectory"), "flowgate");

    // systemd must not SIGKILL a graceful stop that flowgate would still end
    // itself within the default grace period.
    let stop = humantime::parse_duration(&value(&text, "TimeoutStopSec")).expect("TimeoutStopSec");
    let grace = flowgate::config::Global::default().grace_period;
    assert!(
        stop > grace && stop <= grace + Duration::from_secs(30),
        "TimeoutStopSec {stop:?}, grace period {grace:?}"
    );
}

#[test]
fn unit_keeps_only_what_a_proxy_needs() {
    let text = unit_text();
    for (key, expected) in [
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallArchitectures", "native"),
        ("LimitNOFILE", "1048576"),
    ] {
        assert_eq!(value(&text, key), expected, "{key}");
    }
    assert_eq!(
        values(&text, "SystemCallFilter")
            .first()
            .map(String::as_str),
        Some("@system-service")
    );
    assert!(
        value(&text, "DynamicUser") == "yes" || !value(&text, "User").is_empty(),
        "a dedicated or dynamic user"
    );
}
