//! The Debian package: `cross/package-deb` turns a binary (here a stand-in
//! shell script, so no aarch64 or release build is needed) into
//! `edge-agent_<version>_<arch>.deb`, and the package is read back with
//! `dpkg-deb` alone: the binary's path and mode, the config as a conffile
//! (dpkg keeps local edits on upgrade only then), the control fields, and the
//! hardening of the systemd unit.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context as _, bail, ensure};

const VERSION: &str = "0.0.0-test";
const ARCH: &str = "amd64";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cmd`, failing with its command line, status and output unless it
/// succeeds; returns stdout.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let line = format!("{cmd:?}");
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().with_context(|| format!("running {line}"))?;
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    let stderr = String::from_utf8_lossy(&stderr);
    if !status.success() {
        bail!("{line} failed ({status})\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    }
    Ok(stdout)
}

/// `dpkg-deb OPTION DEB [ARGS...]`, e.g. `dpkg-deb -f x.deb Package`.
fn dpkg_deb(option: &str, deb: &Path, args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("dpkg-deb").arg(option).arg(deb).args(args))
}

#[test]
fn package_deb_builds_a_package_with_binary_conffile_and_hardened_unit() -> anyhow::Result<()> {
    // dpkg-deb is part of dpkg, on every Debian and Ubuntu system; fail
    // loudly elsewhere rather than pass without checking anything.
    match Command::new("dpkg-deb").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`dpkg-deb --version` failed ({}): this test needs a working dpkg-deb",
            o.status
        ),
        Err(e) => panic!(
            "dpkg-deb not found ({e}): this test builds and reads a .deb with it; install the `dpkg` package \
             (present on every Debian/Ubuntu system)"
        ),
    }

    let root = repo_root();
    let tmp = tempfile::tempdir()?;

    // A stand-in for the release binary: the package takes any file.
    let binary = tmp.path().join("edge-agent");
    std::fs::write(&binary, "#!/bin/sh\necho \"edge-agent stand-in $*\"\n")?;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
    let out = tmp.path().join("out");

    // Through bash, so a lost executable bit on the script does not matter.
    run(Command::new("bash")
        .arg(root.join("cross/package-deb"))
        .arg("--binary")
        .arg(&binary)
        .args(["--arch", ARCH, "--version", VERSION, "--out"])
        .arg(&out)
        .current_dir(&root))
    .context("cross/package-deb")?;

    let deb = out.join(format!("edge-agent_{VERSION}_{ARCH}.deb"));
    ensure!(
        deb.is_file(),
        "cross/package-deb succeeded but {} is missing",
        deb.display()
    );

    // File list: `-rwxr-xr-x root/root 40 2025-01-01 00:00 ./usr/bin/edge-agent`.
    let contents = dpkg_deb("-c", &deb, &[])?;
    let entry = |path: &str| -> Option<(String, String)> {
        contents.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 6 && fields[5] == path)
                .then(|| (fields[0].to_owned(), fields[1].to_owned()))
        })
    };
    let bin = entry("./usr/bin/edge-agent")
        .with_context(|| format!("./usr/bin/edge-agent not in the package:\n{contents}"))?;
    assert_eq!(
        bin,
        ("-rwxr-xr-x".to_owned(), "root/root".to_owned()),
        "mode and owner of ./usr/bin/edge-agent"
    );
    for path in [
        "./etc/edge-agent/config.toml",
        "./lib/systemd/system/edge-agent.service",
        "./usr/share/doc/edge-agent/README.md",
        "./usr/share/doc/edge-agent/copyright",
    ] {
        let (mode, owner) =
            entry(path).with_context(|| format!("{path} not in the package:\n{contents}"))?;
        assert_eq!(
            (mode.as_str(), owner.as_str()),
            ("-rw-r--r--", "root/root"),
            "mode and owner of {path}"
        );
    }

    // Control fields, one at a time (`-f DEB FIELD` prints the bare value).
    let field = |name: &str| -> anyhow::Result<String> {
        Ok(dpkg_deb("-f", &deb, &[name])?.trim().to_owned())
    };
    assert_eq!(field("Package")?, "edge-agent");
    assert_eq!(field("Architecture")?, ARCH);
    assert_eq!(field("Version")?, VERSION);
    let depends = field("Depends")?;
    assert!(
        depends.contains("libc6 (>= 2.36)") && depends.contains("adduser"),
        "Depends: {depends}"
    );

    // The config is a conffile, and the maintainer scripts are there.
    let conffiles = dpkg_deb("-I", &deb, &["conffiles"])?;
    assert!(
        conffiles
            .lines()
            .any(|l| l.trim() == "/etc/edge-agent/config.toml"),
        "conffiles does not list /etc/edge-agent/config.toml:\n{conffiles}"
    );
    let info = dpkg_deb("-I", &deb, &[])?;
    for script in ["postinst", "prerm", "postrm"] {
        assert!(info.contains(script), "DEBIAN/{script} missing:\n{info}");
    }

    // The unit and the config as installed.
    let unpacked = tmp.path().join("unpacked");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let unit = std::fs::read_to_string(unpacked.join("lib/systemd/system/edge-agent.service"))?;
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for wanted in [
        "Type=notify",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/edge-agent",
        "User=edge-agent",
        "RestartPreventExitStatus=2 3",
        "ExecStart=/usr/bin/edge-agent --config /etc/edge-agent/config.toml run",
    ] {
        assert!(
            lines.contains(&wanted),
            "the unit lacks `{wanted}`:\n{unit}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("WatchdogSec=") && l.len() > "WatchdogSec=".len()),
        "the unit sets no WatchdogSec=:\n{unit}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("PrivateDevices=") && !l.ends_with("=no")),
        "PrivateDevices= would hide the serial ports:\n{unit}"
    );
    let config = std::fs::read_to_string(unpacked.join("etc/edge-agent/config.toml"))?;
    assert!(
        config
            .lines()
            .any(|l| l.trim() == r#"data_dir = "/var/lib/edge-agent""#),
        "the default config does not keep its data in the unit's StateDirectory:\n{config}"
    );
    let packaged = std::fs::read(unpacked.join("usr/bin/edge-agent"))?;
    assert_eq!(
        packaged,
        std::fs::read(&binary)?,
        "the packaged binary is not the one given"
    );
    Ok(())
}
