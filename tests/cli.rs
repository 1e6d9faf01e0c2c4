//! CLI conventions: completions, the man page, one exit-status table (in
//! `--help`, the man page and the README), `FLOWGATE_CONFIG`.

use flowgate::exit::Exit;
use std::path::Path;
use std::process::{Command, Output};

const README: &str = include_str!("../README.md");
const TABLE_START: &str = "<!-- exit status table: generated from flowgate::exit::Exit -->\n";
const TABLE_END: &str = "<!-- end of exit status table -->";

const VALID: &str = r#"
[[exchanges]]
name = "shop"
[[queues]]
name = "orders"
bindings = [{ exchange = "shop", routing_key = "order.created" }]
[[stages]]
name = "reserve"
queue = "orders"
handler = "forward"
output = { exchange = "shop", routing_key = "order.reserved" }
"#;

/// A stage whose handler no factory knows: loads, but fails validation.
const INVALID: &str = r#"
[[queues]]
name = "orders"
[[stages]]
name = "reserve"
queue = "orders"
handler = "no-such-handler"
"#;

fn flowgate(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowgate"));
    cmd.args(args).env_remove("FLOWGATE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run flowgate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn config_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("config written");
    p
}

const SUBCOMMANDS: &[&str] = &[
    "run",
    "check-config",
    "dlq",
    "db",
    "ctl",
    "completions",
    "man",
];

#[test]
fn bash_completions_parse_and_offer_every_subcommand() {
    let out = flowgate(&["completions", "bash"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    assert!(script.contains("complete -F _flowgate"), "{script}");
    for sub in SUBCOMMANDS
        .iter()
        .chain(&["stats", "replay", "purge", "migrate"])
    {
        assert!(script.contains(sub), "offers `{sub}`");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(dir.path(), "flowgate.bash", &script);
    let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(check.status.success(), "bash -n: {}", stderr(&check));
    // Sourced, it registers the completion function.
    let sourced = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p flowgate", file.display()))
        .output()
        .unwrap();
    assert!(
        stdout(&sourced).contains("_flowgate"),
        "registered: {} {}",
        stdout(&sourced),
        stderr(&sourced)
    );
}

#[test]
fn zsh_completions_parse_and_offer_every_subcommand() {
    let out = flowgate(&["completions", "zsh"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    assert!(script.starts_with("#compdef flowgate"), "{script}");
    for sub in SUBCOMMANDS {
        assert!(script.contains(&format!("'{sub}:")), "offers `{sub}`");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(dir.path(), "_flowgate", &script);
    match Command::new("zsh").arg("-n").arg(&file).output() {
        Ok(check) => assert!(check.status.success(), "zsh -n: {}", stderr(&check)),
        // No zsh on this machine: the structure above is all we can check.
        Err(e) => eprintln!("zsh not run ({e}): syntax not checked"),
    }
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let out = flowgate(&["completions", "tcsh"], &[]);
    assert_eq!(out.status.code(), Some(i32::from(Exit::Usage.code())));
}

#[test]
fn the_man_page_renders_with_the_exit_statuses() {
    let out = flowgate(&["man"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = stdout(&out);
    assert!(page.contains(".TH flowgate 1"), "{page}");
    // groff turns it into text without complaint.
    let mut groff = Command::new("groff")
        .args(["-man", "-Tascii", "-ww", "-rLL=400n", "-rHY=0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("groff is installed");
    std::io::Write::write_all(&mut groff.stdin.take().unwrap(), page.as_bytes()).unwrap();
    let text = groff.wait_with_output().unwrap();
    assert!(text.status.success(), "{}", stderr(&text));
    assert!(
        stderr(&text).is_empty(),
        "groff warnings: {}",
        stderr(&text)
    );
    // Without overstrikes (bold, underline) and with lines joined.
    let mut rendered = String::new();
    for c in stdout(&text).chars() {
        if c == '\u{8}' {
            rendered.pop();
        } else {
            rendered.push(c);
        }
    }
    let rendered = rendered.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(rendered.contains("NAME flowgate"), "{rendered}");
    for sub in SUBCOMMANDS {
        assert!(
            rendered.contains(&format!("flowgate-{sub}(1)")),
            "names `{sub}`: {rendered}"
        );
    }
    for e in Exit::ALL {
        let line = format!("{} {}", e.code(), e.meaning());
        assert!(rendered.contains(&line), "exit status `{line}`: {rendered}");
    }
}

#[test]
fn help_ends_with_the_exit_status_table() {
    let out = flowgate(&["--help"], &[]);
    assert!(out.status.success());
    let help = stdout(&out);
    assert!(
        help.trim_end().ends_with(Exit::help_text().trim_end()),
        "{help}"
    );
}

/// The README's table is `Exit::readme_table()`, exactly.
/// `FLOWGATE_BLESS=1 cargo test --test cli` rewrites it.
#[test]
fn the_readme_exit_status_table_is_generated() {
    let want = Exit::readme_table();
    let start = README.find(TABLE_START).expect("the table's start marker") + TABLE_START.len();
    let end = start
        + README[start..]
            .find(TABLE_END)
            .expect("the table's end marker");
    let got = &README[start..end];
    if got != want && std::env::var_os("FLOWGATE_BLESS").is_some() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let text = format!("{}{want}{}", &README[..start], &README[end..]);
        std::fs::write(path, text).expect("README written");
        return;
    }
    assert!(
        got == want,
        "README exit status table is stale (FLOWGATE_BLESS=1 cargo test --test cli rewrites it); want:\n{want}"
    );
}

#[test]
fn an_invalid_config_exits_with_the_usage_status_on_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let bad = config_file(dir.path(), "bad.toml", INVALID);
    let bad = bad.to_str().unwrap();
    for args in [
        &["check-config", "--config", bad][..],
        &["run", "--config", bad],
        &["dlq", "stats", "--queue", "q", "--config", bad],
        &["db", "migrate", "--config", bad],
    ] {
        let out = flowgate(args, &[]);
        assert_eq!(
            out.status.code(),
            Some(i32::from(Exit::Usage.code())),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("no-such-handler"),
            "says why: {}",
            stderr(&out)
        );
    }
    let missing = flowgate(
        &["check-config", "--config", "/nonexistent/flowgate.toml"],
        &[],
    );
    assert_eq!(missing.status.code(), Some(i32::from(Exit::Usage.code())));
}

#[test]
fn flowgate_config_stands_in_for_config_on_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let good = config_file(dir.path(), "good.toml", VALID);
    let bad = config_file(dir.path(), "bad.toml", INVALID);

    // check-config: the file the variable names is the one checked.
    let out = flowgate(&["check-config"], &[("FLOWGATE_CONFIG", &good)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("good.toml: ok"), "{}", stdout(&out));

    // Without it and without --config: a usage error naming --config.
    let out = flowgate(&["check-config"], &[]);
    assert_eq!(out.status.code(), Some(i32::from(Exit::Usage.code())));
    assert!(stderr(&out).contains("--config"), "{}", stderr(&out));

    // run, dlq stats|replay|purge: the variable's (invalid) file is read.
    for args in [
        &["run"][..],
        &["dlq", "stats", "--queue", "q"],
        &["dlq", "replay", "--queue", "q"],
        &["dlq", "purge", "--queue", "q", "--yes"],
        &["db", "migrate"],
    ] {
        let out = flowgate(args, &[("FLOWGATE_CONFIG", &bad)]);
        assert_eq!(
            out.status.code(),
            Some(i32::from(Exit::Usage.code())),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("bad.toml"),
            "{args:?} read FLOWGATE_CONFIG: {}",
            stderr(&out)
        );
    }

    // ctl: the variable's file is read too (ctl only reads `[management]`:
    // a file that is not TOML at all).
    let broken = config_file(dir.path(), "broken.toml", "[management\nbind = ");
    let out = flowgate(&["ctl", "stages"], &[("FLOWGATE_CONFIG", &broken)]);
    assert_eq!(out.status.code(), Some(i32::from(Exit::Usage.code())));
    assert!(stderr(&out).contains("broken.toml"), "{}", stderr(&out));

    // --config wins over the variable.
    let out = flowgate(
        &["check-config", "--config", good.to_str().unwrap()],
        &[("FLOWGATE_CONFIG", &bad)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}
