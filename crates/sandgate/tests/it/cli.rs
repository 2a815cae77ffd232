//! The `sandgate` command line: `serve --check-config` accepts a good configuration and
//! refuses a bad one with status 64 and a message naming the setting, and prints the effective
//! configuration as TOML that reads back; `--help` lists features and every default.

use std::process::Command;

/// The binary, without the test process's gateway settings in its environment.
pub(crate) fn sandgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sandgate"));
    // The test's own environment must not leak settings into these runs.
    for var in [
        "PORT",
        "GATEWAY_PORT",
        "PROXY_TIMEOUT",
        "MAX_CONCURRENT_REQUESTS",
        "AUTH_ENABLED",
        "SANDGATE_ADMIN_KEY",
        "SANDGATE_TLS_CERT",
        "SANDGATE_TLS_KEY",
    ] {
        c.env_remove(var);
    }
    c
}

#[test]
fn check_config_accepts_a_good_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sandgate.toml");
    std::fs::write(&file, "port = 9999\n[docker]\nmemory_mb = 256\n").unwrap();
    let out = sandgate()
        .args(["serve", "--check-config", "--config"])
        .arg(&file)
        .env("PROXY_TIMEOUT", "7")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration ok"), "{stdout}");
    assert!(stdout.contains("\nport = 9999\n"), "{stdout}");
    assert!(stdout.contains("\nproxy_timeout = 7.0\n"), "{stdout}");
    assert!(stdout.contains("memory_mb = 256"), "{stdout}");
    // It is TOML that `--config` reads back to the same configuration.
    let saved = dir.path().join("saved.toml");
    std::fs::write(&saved, &*stdout).unwrap();
    let again = sandgate()
        .args(["serve", "--check-config", "--config"])
        .arg(&saved)
        .output()
        .unwrap();
    assert!(again.status.success(), "{again:?}");
    assert_eq!(String::from_utf8_lossy(&again.stdout), stdout);
}

#[test]
fn check_config_refuses_bad_values_with_status_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "prot = 9000\n").unwrap();
    type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec![], vec![("PROXY_TIMEOUT", "-1")], "PROXY_TIMEOUT"),
        (
            vec!["--header-timeout".into(), "0".into()],
            vec![],
            "SANDGATE_HEADER_TIMEOUT",
        ),
        (
            vec![],
            vec![("MAX_CONCURRENT_REQUESTS", "0")],
            "MAX_CONCURRENT_REQUESTS",
        ),
        (vec![], vec![("PORT", "eighty")], "PORT"),
        (
            vec!["--port-range".into(), "9-8".into()],
            vec![],
            "port range",
        ),
        (
            vec!["--config".into(), file.display().to_string()],
            vec![],
            "prot",
        ),
        (
            vec!["--host".into(), "0.0.0.0".into()],
            vec![("AUTH_ENABLED", "false")],
            "AUTH_ENABLED=false is allowed only on a loopback address",
        ),
        (
            vec![],
            vec![("SANDGATE_ADMIN_KEY", "short")],
            "SANDGATE_ADMIN_KEY",
        ),
    ];
    for (args, env, needle) in cases {
        let out = sandgate()
            .args(["serve", "--check-config"])
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?} was accepted");
        // clap's own parse errors exit 2; our validation exits 64. Both name the problem.
        assert!(
            matches!(out.status.code(), Some(64) | Some(2)),
            "{args:?} {env:?}: {:?}",
            out.status
        );
        assert!(stderr.contains(needle), "{args:?} {env:?}: {stderr}");
    }
}

#[test]
fn help_names_the_routes_and_settings() {
    let out = sandgate().args(["serve", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--port",
        "GATEWAY_PORT",
        "PROXY_TIMEOUT",
        "--isolation",
        "--check-config",
        // Each setting's default, from the same table `--check-config` prints.
        "[default: 8070]",
        "[default: 30]",
        "[default: 10.201.0.0/16]",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}: {text}");
    }
}

#[test]
fn check_config_never_prints_secrets() {
    let key = "a-very-secret-admin-key-0123456789abcdef";
    let out = sandgate()
        .args(["serve", "--check-config"])
        .env("SANDGATE_ADMIN_KEY", key)
        .env(
            "TOKEN_SECRET",
            "another-secret-token-signing-key-0123456789",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("configuration ok"), "{text}");
    assert!(
        !text.contains(key) && !text.contains("another-secret"),
        "{text}"
    );
}

/// A bad flag or environment value (clap's own errors) is a bad configuration too: status 64
/// and one line naming the setting. `--host localhost` works, on the command line and in the
/// file.
#[test]
fn bad_flags_exit_64_with_one_line_and_localhost_is_a_host() {
    for (args, env, names) in [
        (vec!["serve", "--port", "abc"], None, "--port"),
        (vec!["serve", "--bogus"], None, "--bogus"),
        (
            vec!["serve", "--check-config"],
            Some(("GATEWAY_PORT", "xyz")),
            "--port",
        ),
        (vec!["serve", "--host", "example.com"], None, "--host"),
    ] {
        let mut cmd = sandgate();
        cmd.args(&args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
    }
    let out = sandgate()
        .args(["serve", "--check-config", "--host", "localhost"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("host = \"127.0.0.1\""));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sandgate.toml");
    std::fs::write(&file, "host = \"localhost\"\n").unwrap();
    let out = sandgate()
        .args(["serve", "--check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --help and --version still succeed.
    for flag in ["--help", "--version"] {
        let out = sandgate().arg(flag).output().unwrap();
        assert!(out.status.success(), "{flag}");
    }
}
