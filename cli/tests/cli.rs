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
    let out = trellis(&["waypoint", "apply", "-n", "shop"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(text.contains("not available yet"), "{text}");
}

#[test]
fn leaving_a_federation_never_joined_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = trellis(&["federation", "leave", "--manifests", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(
        text.contains("federation.yaml does not exist: this cluster has not joined"),
        "{text}"
    );
}

#[test]
fn a_typo_gets_a_suggestion() {
    let out = trellis(&["federaton"]);
    assert!(!out.status.success());
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(text.contains("federation"), "{text}");
}

#[test]
fn a_bad_lab_name_is_refused_before_anything_is_made() {
    let out = trellis(&["lab", "up", "--name", "Not_OK"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(text.contains("lab name \"Not_OK\" is not valid"), "{text}");
}

#[test]
fn a_topology_with_an_unknown_field_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.yaml");
    std::fs::write(&file, "clusters:\n  - name: east\n    nodez: 2\n").unwrap();
    let out = trellis(&["lab", "up", "--name", "t", "--file", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(text.contains("nodez") && text.contains("line 3"), "{text}");
}

#[test]
fn demo_help_documents_its_verbs() {
    let out = trellis(&["demo", "--help"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for verb in ["server", "call", "client"] {
        assert!(text.contains(verb), "{text}");
    }
}
