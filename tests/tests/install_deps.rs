//! The test command's installation logic (`tools/lib/deps.sh`), run by bash on fixture trees of
//! APT configuration: the machine's own APT configuration is never read or changed.
//!
//! Two layers: the source parsing and mirror detection on `sources.list` / `sources.list.d`
//! fixtures (third-party entries listed first, deb822 and one-line formats, backports present or
//! absent, a source file an earlier version wrote with a wrong URI); and the whole qemu-system
//! installation flow with `apt-get`, `apt-cache` and `dpkg-query` replaced by stubs that record
//! their calls and answer from the fixture (update failing, packages missing, running twice).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BPO: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";
const STABLE: &str = "1:7.2+dfsg-7+deb12u18+b2";
const DEBIAN: &str = "http://deb.debian.org/debian";

fn lib() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/lib/deps.sh")
}

/// A fixture: an APT configuration tree, package lists, and a directory of stub commands.
struct Fix {
    dir: tempfile::TempDir,
}

impl Fix {
    fn new() -> Fix {
        let dir = tempfile::tempdir().unwrap();
        for d in ["etc/apt/sources.list.d", "lists", "bin"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let f = Fix { dir };
        f.stubs();
        f
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) -> &Self {
        fs::write(self.p(rel), text).unwrap();
        self
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.p(rel)).unwrap_or_default()
    }

    /// Stubs for the package tools, plus links to the few real tools the library uses, so that
    /// nothing else on the machine (an installed qemu-system-x86_64, real apt) is reachable.
    fn stubs(&self) {
        let bin = self.p("bin");
        for tool in [
            "awk", "grep", "cat", "tee", "rm", "head", "tr", "env", "sed", "cp",
        ] {
            let real = ["/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("{tool} not found"));
            std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
        }
        let fx = self.dir.path().display().to_string();
        let stub = |name: &str, body: &str| {
            let p = bin.join(name);
            fs::write(&p, format!("#!/bin/bash\nF={fx}\n{body}\n")).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        };
        stub("id", "echo 0");
        stub("sudo", "exec \"$@\"");
        stub(
            "dpkg-query",
            r#"pkg="${!#}"
if [[ "$*" == *Version* ]]; then cat "$F/version.$pkg" 2>/dev/null || exit 1
elif [ -e "$F/installed.$pkg" ]; then echo "install ok installed"; else exit 1; fi"#,
        );
        stub(
            "apt-cache",
            r#"echo "apt-cache $*" >> "$F/calls"
# Like the real one, it writes more than a pipe holds after the Candidate line: a reader
# that stops early kills it with SIGPIPE.
[ "$1" = policy ] && { cat "$F/policy.$2" 2>/dev/null; printf '%01048576d\n' 0; }; exit 0"#,
        );
        stub(
            "apt-get",
            r#"echo "apt-get $*" >> "$F/calls"
case "$*" in
*update*sourcelist*) [ -e "$F/fail.update-backports" ] && { echo "E: cannot reach" >&2; exit 100; }
    [ -e "$F/after-update" ] && cp "$F/after-update" "$F/policy.qemu-system-x86"; exit 0 ;;
*update*) [ -e "$F/after-update" ] && cp "$F/after-update" "$F/policy.qemu-system-x86"
    [ -e "$F/fail.update" ] && { echo "W: Failed to fetch https://third.example/x" >&2; exit 100; }; exit 0 ;;
*install\ -s*) [ -e "$F/fail.simulate" ] && { echo "E: Unable to correct problems, you have held broken packages."; exit 100; }; exit 0 ;;
*install*) exit 0 ;;
esac"#,
        );
    }

    /// Runs `script` (bash) with the library sourced and the fixture as the APT configuration.
    fn run(&self, script: &str) -> Output {
        Command::new("/bin/bash")
            .arg("-c")
            .arg(format!(
                "set -euo pipefail; . '{}'; {script}",
                lib().display()
            ))
            .env_clear()
            .env("PATH", self.p("bin"))
            .env("STANDBY_APT_ETC", self.p("etc/apt"))
            .env("STANDBY_APT_LISTS", self.p("lists"))
            .output()
            .unwrap()
    }

    fn ok(&self, script: &str) -> String {
        let out = self.run(script);
        assert!(
            out.status.success(),
            "`{script}` failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn calls(&self) -> Vec<String> {
        self.read("calls").lines().map(str::to_string).collect()
    }

    fn backports_file(&self) -> PathBuf {
        self.p("etc/apt/sources.list.d/bookworm-backports.sources")
    }

    fn sources_files(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.p("etc/apt/sources.list.d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

const DEBIAN_SOURCES: &str = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
const NODESOURCE: &str = "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\nSigned-By: /usr/share/keyrings/nodesource.gpg\n";
/// A third-party repository that even names the suite `bookworm`.
const DOCKER_LIST: &str =
    "deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/debian bookworm stable\n";
/// What the first version of the script wrote on the machine of the report.
const OLD_WRONG_FILE: &str = "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";

fn policy(versions: &[(&str, u32, &str)]) -> String {
    let mut s =
        format!("qemu-system-x86:\n  Installed: (none)\n  Candidate: {STABLE}\n  Version table:\n");
    for (v, prio, suite) in versions {
        s += &format!("     {v} {prio}\n        {prio} {DEBIAN} {suite}/main amd64 Packages\n");
    }
    s
}

/// The machine of the report: third-party sources listed before Debian's, in both formats.
fn reported_machine() -> Fix {
    let f = Fix::new();
    f.write("etc/apt/sources.list.d/00-nodesource.sources", NODESOURCE)
        .write("etc/apt/sources.list.d/a-docker.list", DOCKER_LIST)
        .write("etc/apt/sources.list.d/debian.sources", DEBIAN_SOURCES)
        .write(
            "etc/apt/sources.list",
            "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n",
        );
    f
}

#[test]
fn the_mirror_comes_from_debians_entry_wherever_it_is_listed() {
    let f = reported_machine();
    assert_eq!(f.ok("debian_mirror"), DEBIAN);
    // One-line format, with options, in sources.list; a disabled deb822 stanza and a file apt
    // ignores (wrong extension) name other hosts.
    let f = Fix::new();
    f.write("etc/apt/sources.list.d/00-nodesource.sources", NODESOURCE)
        .write(
            "etc/apt/sources.list.d/debian.sources",
            "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n",
        )
        .write(
            "etc/apt/sources.list.d/mirror.list.disabled",
            "deb http://ignored.example/debian bookworm main\n",
        )
        .write(
            "etc/apt/sources.list",
            "# deb http://commented.example/debian bookworm main\ndeb-src http://src.example/debian bookworm main\ndeb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://ftp.de.debian.org/debian/ bookworm main contrib\n",
        );
    assert_eq!(f.ok("debian_mirror"), "http://ftp.de.debian.org/debian");
    // A mirror on an unusual path is recognised by the release file apt fetched for it; a
    // release file of another origin disqualifies an entry that otherwise looks right.
    let f = Fix::new();
    f.write(
        "etc/apt/sources.list",
        "deb http://lookalike.example/debian bookworm main\ndeb http://mirror.example/pub/linux/deb_archive bookworm main\n",
    )
    .write(
        "lists/lookalike.example_debian_dists_bookworm_InRelease",
        "Origin: Lookalike\nSuite: bookworm\n",
    )
    .write(
        "lists/mirror.example_pub_linux_deb%5farchive_dists_bookworm_InRelease",
        "Origin: Debian\nLabel: Debian\nSuite: stable\nCodename: bookworm\n",
    );
    assert_eq!(
        f.ok("debian_mirror"),
        "http://mirror.example/pub/linux/deb_archive"
    );
    // deb822 with several URIs and folded lines.
    let f = Fix::new();
    f.write(
        "etc/apt/sources.list.d/debian.sources",
        "Types: deb deb-src\nURIs: https://third.example/repo\n http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n",
    );
    assert_eq!(f.ok("debian_mirror"), DEBIAN);
}

#[test]
fn without_a_debian_entry_the_mirror_is_not_guessed() {
    let f = Fix::new();
    f.write("etc/apt/sources.list.d/00-nodesource.sources", NODESOURCE)
        .write("etc/apt/sources.list.d/docker.list", DOCKER_LIST);
    let out = f.run("debian_mirror");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
}

#[test]
fn backports_are_recognised_when_configured_and_ours_when_wrong() {
    let f = reported_machine();
    assert_eq!(f.ok(&format!("backports_status {DEBIAN}")), "absent");
    f.write(
        "etc/apt/sources.list.d/bookworm-backports.sources",
        OLD_WRONG_FILE,
    );
    assert_eq!(f.ok(&format!("backports_status {DEBIAN}")), "ours-wrong");
    f.write(
        "etc/apt/sources.list.d/backports.list",
        "deb http://deb.debian.org/debian/ bookworm-backports main\n",
    );
    assert_eq!(f.ok(&format!("backports_status {DEBIAN}")), "configured");
}

#[test]
fn a_backports_build_of_qemu_utils_gets_backports_from_the_debian_mirror() {
    let f = reported_machine();
    f.write("version.qemu-utils", BPO)
        .write(
            "policy.qemu-system-x86",
            &policy(&[(STABLE, 500, "bookworm")]),
        )
        .write(
            "after-update",
            &policy(&[(BPO, 100, "bookworm-backports"), (STABLE, 500, "bookworm")]),
        );
    f.ok("install_qemu_system");
    let text = fs::read_to_string(f.backports_file()).unwrap();
    assert!(text.contains(&format!("URIs: {DEBIAN}\n")), "{text}");
    assert!(!text.contains("nodesource"));
    let calls = f.calls();
    let update = calls
        .iter()
        .find(|c| c.starts_with("apt-get update"))
        .expect("an update");
    // Only the new source is updated: the unreachable third-party ones cannot fail it.
    assert!(
        update.contains("Dir::Etc::sourcelist=") && update.contains("Dir::Etc::sourceparts=-"),
        "{update}"
    );
    let install = calls.last().unwrap();
    assert!(
        install.contains("install -y")
            && install.contains("-t bookworm-backports")
            && install.contains(&format!("qemu-system-x86={BPO}")),
        "{calls:?}"
    );
    // Twice in a row: the same single file, no second update of the source.
    let before = f.sources_files();
    fs::remove_file(f.p("calls")).unwrap();
    f.ok("install_qemu_system");
    assert_eq!(f.sources_files(), before);
    assert_eq!(fs::read_to_string(f.backports_file()).unwrap(), text);
    assert!(
        !f.calls().iter().any(|c| c.starts_with("apt-get update")),
        "{:?}",
        f.calls()
    );
    // Writing the source again directly changes nothing either.
    f.ok(&format!("write_backports_source {DEBIAN}"));
    assert_eq!(fs::read_to_string(f.backports_file()).unwrap(), text);
}

#[test]
fn a_source_file_written_earlier_with_a_wrong_uri_is_repaired() {
    let f = reported_machine();
    f.write(
        "etc/apt/sources.list.d/bookworm-backports.sources",
        OLD_WRONG_FILE,
    )
    .write("version.qemu-utils", BPO)
    .write(
        "policy.qemu-system-x86",
        &policy(&[(STABLE, 500, "bookworm")]),
    )
    .write(
        "after-update",
        &policy(&[(BPO, 100, "bookworm-backports"), (STABLE, 500, "bookworm")]),
    );
    let out = f.ok("install_qemu_system");
    assert!(out.contains("repairing"), "{out}");
    let text = fs::read_to_string(f.backports_file()).unwrap();
    assert!(text.contains(&format!("URIs: {DEBIAN}\n")) && !text.contains("nodesource"));
}

#[test]
fn no_suite_is_added_when_the_matching_build_is_available() {
    // Backports configured by the admin (one-line format): the matching build is offered.
    let f = reported_machine();
    f.write(
        "etc/apt/sources.list.d/backports.list",
        "deb http://deb.debian.org/debian bookworm-backports main\n",
    )
    .write("version.qemu-utils", BPO)
    .write(
        "policy.qemu-system-x86",
        &policy(&[(BPO, 100, "bookworm-backports"), (STABLE, 500, "bookworm")]),
    );
    f.ok("install_qemu_system");
    assert!(!f.backports_file().exists());
    assert!(f
        .calls()
        .last()
        .unwrap()
        .contains(&format!("-t bookworm-backports qemu-system-x86={BPO}")));
    // qemu-utils from stable: qemu-system-x86 from stable, nothing added.
    let f = reported_machine();
    f.write("version.qemu-utils", STABLE).write(
        "policy.qemu-system-x86",
        &policy(&[(STABLE, 500, "bookworm")]),
    );
    f.ok("install_qemu_system");
    assert!(!f.backports_file().exists());
    assert!(f
        .calls()
        .last()
        .unwrap()
        .contains(&format!("-t bookworm qemu-system-x86={STABLE}")));
}

#[test]
fn a_failed_update_undoes_the_source_and_says_what_to_run() {
    let f = reported_machine();
    f.write("version.qemu-utils", BPO)
        .write(
            "policy.qemu-system-x86",
            &policy(&[(STABLE, 500, "bookworm")]),
        )
        .write("fail.update-backports", "");
    let before = f.sources_files();
    let out = f.run("install_qemu_system");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot install qemu-system-x86") && err.contains("by hand"),
        "{err}"
    );
    assert_eq!(f.sources_files(), before, "the source file was not undone");
    assert!(!f.calls().iter().any(|c| c.contains("install -y")));
}

#[test]
fn a_repaired_file_is_restored_when_the_install_cannot_proceed() {
    let f = reported_machine();
    f.write(
        "etc/apt/sources.list.d/bookworm-backports.sources",
        OLD_WRONG_FILE,
    )
    .write("version.qemu-utils", BPO)
    .write(
        "policy.qemu-system-x86",
        &policy(&[(STABLE, 500, "bookworm")]),
    )
    .write(
        "after-update",
        &policy(&[(BPO, 100, "bookworm-backports"), (STABLE, 500, "bookworm")]),
    )
    .write("fail.simulate", "");
    let out = f.run("install_qemu_system");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("held broken packages"), "{err}");
    assert_eq!(
        fs::read_to_string(f.backports_file()).unwrap(),
        OLD_WRONG_FILE
    );
    assert!(!f.calls().iter().any(|c| c.contains("install -y")));
}

#[test]
fn without_a_debian_entry_the_emulator_is_refused_with_instructions() {
    let f = Fix::new();
    f.write("etc/apt/sources.list.d/00-nodesource.sources", NODESOURCE)
        .write("version.qemu-utils", BPO)
        .write(
            "policy.qemu-system-x86",
            "qemu-system-x86:\n  Candidate: (none)\n",
        );
    let out = f.run("install_qemu_system");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no APT source lists Debian's bookworm") && err.contains("apt-get install"),
        "{err}"
    );
    assert_eq!(f.sources_files(), vec!["00-nodesource.sources".to_string()]);
}

#[test]
fn an_unreachable_repository_does_not_stop_the_packages_but_a_missing_one_is_named() {
    let f = reported_machine();
    f.write("fail.update", "")
        .write("policy.fio", "fio:\n  Candidate: 3.33-3\n")
        .write("policy.nbdkit", "nbdkit:\n  Candidate: 1.32.5-1\n")
        .write("installed.rsync", "");
    let out = f.ok("install_apt_packages fio nbdkit rsync");
    assert!(out.contains("installing"), "{out}");
    let last = f.calls().last().unwrap().clone();
    assert!(
        last.contains("install -y") && last.contains("fio nbdkit") && !last.contains("rsync"),
        "{last}"
    );
    let f = reported_machine();
    f.write("policy.fio", "fio:\n  Candidate: 3.33-3\n")
        .write("policy.nosuch", "nosuch:\n  Candidate: (none)\n");
    let out = f.run("install_apt_packages fio nosuch");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot install nosuch") && err.contains("no configured APT source"),
        "{err}"
    );
    assert!(!f.calls().iter().any(|c| c.contains("install -y")));
}
