//! The `trellis` binary as a user runs it.

use std::process::Command;

fn trellis(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trellis")).args(args).output().unwrap()
}

#[test]
fn help_names_every_verb() {
    let out = trellis(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for verb in ["federation", "namespace", "waypoint", "traffic", "status", "lab"] {
        assert!(text.contains(verb), "{text}");
    }
}

#[test]
fn verbs_not_yet_built_say_so_and_fail() {
    let out = trellis(&["lab", "up"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(text.contains("not available yet"), "{text}");
}

#[test]
fn a_typo_gets_a_suggestion() {
    let out = trellis(&["federaton"]);
    assert!(!out.status.success());
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(text.contains("federation"), "{text}");
}
