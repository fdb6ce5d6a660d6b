//! Edits to the manifest directory made on the user's behalf (`trellis namespace label`):
//! the Namespace document is rewritten in place, or created in its own file, and written
//! atomically so trellisd never reads half a file. serde-saphyr writes the YAML and finds the
//! document to replace; every other byte of the file (other documents, comments, `---` markers)
//! is kept as it was.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manifest::{document_roots, parse_file, MAX_FILE_BYTES};

/// Why a label could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    /// `object` names it: `namespace shop`, `service shop/cart`.
    #[error("{object} has no label {key}; nothing to remove")]
    NoSuchLabel { object: String, key: String },
}

/// Checks a Kubernetes label key (`[prefix/]name`) and value.
pub fn check_label(key: &str, value: Option<&str>) -> Result<(), EditError> {
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
    };
    let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
    });
    if !name_ok(name) || !prefix_ok {
        return Err(EditError::Invalid(format!(
            "label key {key:?} is not valid: [prefix/]name, name of letters, digits, '-', '_', '.' (at most 63)"
        )));
    }
    if let Some(v) = value {
        if !(v.is_empty() || name_ok(v)) {
            return Err(EditError::Invalid(format!(
                "label value {v:?} is not valid: letters, digits, '-', '_', '.' (at most 63), starting and ending alphanumeric"
            )));
        }
    }
    Ok(())
}

/// A Namespace document: what `label_namespace` reads back and writes.
#[derive(Debug, Deserialize, Serialize)]
struct NamespaceDoc {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: NamespaceMeta,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct NamespaceMeta {
    #[serde(default)]
    name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

impl NamespaceDoc {
    fn new(namespace: &str, labels: BTreeMap<String, String>) -> NamespaceDoc {
        NamespaceDoc {
            api_version: "v1".into(),
            kind: "Namespace".into(),
            metadata: NamespaceMeta {
                name: namespace.into(),
                labels,
                annotations: BTreeMap::new(),
            },
        }
    }

    fn to_yaml(&self) -> Result<String, String> {
        serde_saphyr::to_string(self).map_err(|e| format!("cannot write the Namespace document: {e}"))
    }
}

/// `text` with the root at `range` replaced by `yaml` (a whole document, newline-terminated).
fn splice(text: &str, range: Range<usize>, yaml: &str) -> String {
    let (mut before, after) = (&text[..range.start], &text[range.end..]);
    // A root that shares its line with `---` moves to a line of its own.
    let mut lead = "";
    if !before.is_empty() && !before.ends_with('\n') {
        before = before.trim_end_matches([' ', '\t']);
        lead = "\n";
    }
    let body = if after.starts_with('\n') || after.starts_with("\r\n") {
        yaml.trim_end_matches('\n')
    } else {
        yaml
    };
    format!("{before}{lead}{body}{after}")
}

/// Writes `text` to `path` through a hidden temporary file and a rename: trellisd never reads
/// half a file.
pub fn write_atomically(path: &Path, text: &str) -> Result<(), EditError> {
    let err = |e: std::io::Error| EditError::File {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("manifest");
    // A hidden temporary name: the directory watcher skips dot files.
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    // Never through whatever already sits at the temporary name (a link planted there).
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(err)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// The text of manifest `path` if trellisd would read it too: a regular file, or a symbolic link
/// to one inside `root` (canonical), of at most [`MAX_FILE_BYTES`]. Opened without blocking and
/// read with a bound, so a FIFO, a device or a file swapped in meanwhile cannot hang or flood
/// the CLI (which may run as root).
fn read_manifest(root: &Path, path: &Path) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let source = std::fs::canonicalize(path).ok().filter(|p| p.starts_with(root))?;
    // Not even opened unless a regular file: opening a device can have effects of its own.
    if !std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(&source)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES as u64 {
        return None;
    }
    let mut text = String::new();
    file.take(MAX_FILE_BYTES as u64 + 1).read_to_string(&mut text).ok()?;
    (text.len() <= MAX_FILE_BYTES).then_some(text)
}

/// The manifests of `dir` trellisd reads, sorted, with the directory's canonical path: `*.yaml`
/// and `*.yml` files, in subdirectories too, skipping dot files and links to directories.
fn manifest_files(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>), EditError> {
    if !dir.is_dir() {
        return Err(EditError::File {
            path: dir.to_path_buf(),
            why: "not a directory (set --manifests or TRELLIS_MANIFESTS)".into(),
        });
    }
    let mut files: Vec<PathBuf> = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| EditError::File {
            path: d.clone(),
            why: e.to_string(),
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
            {
                continue;
            }
            // The entry's own type: a symbolic link to a directory is not walked into.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                files.push(path);
            }
        }
    }
    files.sort();
    let root = dir.canonicalize().map_err(|e| EditError::File {
        path: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    Ok((root, files))
}

/// `labels` with `key` set to `value`, or removed (`None`): removing a label that is not there is
/// an error naming the `object`.
fn relabel(
    labels: &BTreeMap<String, String>,
    key: &str,
    value: Option<&str>,
    object: impl FnOnce() -> String,
) -> Result<BTreeMap<String, String>, EditError> {
    let mut labels = labels.clone();
    match value {
        Some(v) => {
            labels.insert(key.to_string(), v.to_string());
        }
        None if labels.remove(key).is_none() => {
            return Err(EditError::NoSuchLabel {
                object: object(),
                key: key.to_string(),
            })
        }
        None => {}
    }
    Ok(labels)
}

/// Sets (`Some(value)`) or removes (`None`) a label on namespace `namespace` in the manifest
/// directory `dir`. Returns the file written.
pub fn label_namespace(dir: &Path, namespace: &str, key: &str, value: Option<&str>) -> Result<PathBuf, EditError> {
    trellis_identity::id::check_name(namespace).map_err(|e| EditError::Invalid(e.to_string()))?;
    check_label(key, value)?;
    let (root, files) = manifest_files(dir)?;
    for path in files {
        // What trellisd would not read (it reports each by name) is not read here either.
        let Some(text) = read_manifest(&root, &path) else {
            continue;
        };
        let Ok(inventory) = parse_file(&text) else { continue };
        let Some((ns, _)) = inventory.namespaces.get(namespace) else {
            continue;
        };
        let labels = relabel(&ns.labels, key, value, || format!("namespace {namespace}"))?;
        let file_error = |why: String| EditError::File {
            path: path.clone(),
            why,
        };
        let mut found = None;
        for range in document_roots(&text).map_err(|(line, why)| file_error(format!("line {line}: {why}")))? {
            if let Ok(doc) = serde_saphyr::from_str::<NamespaceDoc>(&text[range.clone()]) {
                if doc.kind == "Namespace" && doc.metadata.name == namespace {
                    found = Some((range, doc));
                    break;
                }
            }
        }
        let (range, mut doc) =
            found.ok_or_else(|| file_error(format!("cannot find the Namespace {namespace} document")))?;
        doc.metadata.labels = labels;
        let yaml = doc.to_yaml().map_err(file_error)?;
        write_atomically(&path, &splice(&text, range, &yaml))?;
        return Ok(path);
    }
    let Some(v) = value else {
        return Err(EditError::NoSuchLabel {
            object: format!("namespace {namespace}"),
            key: key.to_string(),
        });
    };
    let path = dir.join(format!("namespace-{namespace}.yaml"));
    let labels = BTreeMap::from([(key.to_string(), v.to_string())]);
    let yaml = NamespaceDoc::new(namespace, labels)
        .to_yaml()
        .map_err(|why| EditError::File {
            path: path.clone(),
            why,
        })?;
    write_atomically(&path, &yaml)?;
    Ok(path)
}

/// A Service (or any namespaced object) document: `metadata.labels` is rewritten, everything
/// else carried as it was read.
#[derive(Debug, Deserialize, Serialize)]
struct ObjectDoc {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

/// Sets (`Some(value)`) or removes (`None`) a label on Service `namespace/name` in the manifest
/// directory `dir` (`trellis service label`, e.g. `trellis.io/global=true` to export it). The
/// Service must be in the manifests. Returns the file written.
pub fn label_service(
    dir: &Path,
    namespace: &str,
    name: &str,
    key: &str,
    value: Option<&str>,
) -> Result<PathBuf, EditError> {
    for n in [namespace, name] {
        trellis_identity::id::check_name(n).map_err(|e| EditError::Invalid(e.to_string()))?;
    }
    check_label(key, value)?;
    let (root, files) = manifest_files(dir)?;
    let wanted = crate::inventory::ObjectKey::new(namespace, name);
    for path in files {
        let Some(text) = read_manifest(&root, &path) else {
            continue;
        };
        let Ok(inventory) = parse_file(&text) else { continue };
        let Some((svc, _)) = inventory.services.get(&wanted) else {
            continue;
        };
        let labels = relabel(&svc.labels, key, value, || format!("service {namespace}/{name}"))?;
        let file_error = |why: String| EditError::File {
            path: path.clone(),
            why,
        };
        let mut found = None;
        for range in document_roots(&text).map_err(|(line, why)| file_error(format!("line {line}: {why}")))? {
            if let Ok(doc) = serde_saphyr::from_str::<ObjectDoc>(&text[range.clone()]) {
                let ns = if doc.metadata.namespace.is_empty() {
                    "default"
                } else {
                    &doc.metadata.namespace
                };
                if doc.kind == "Service" && doc.metadata.name == name && ns == namespace {
                    found = Some((range, doc));
                    break;
                }
            }
        }
        let (range, mut doc) =
            found.ok_or_else(|| file_error(format!("cannot find the Service {namespace}/{name} document")))?;
        doc.metadata.labels = labels;
        let yaml =
            serde_saphyr::to_string(&doc).map_err(|e| file_error(format!("cannot write the Service document: {e}")))?;
        let edited = splice(&text, range, &yaml);
        // What trellisd will read must still hold the same Service.
        match parse_file(&edited) {
            Ok(inv) if inv.services.contains_key(&wanted) => {}
            _ => {
                return Err(file_error(
                    "the edited document would not parse; nothing written".into(),
                ))
            }
        }
        write_atomically(&path, &edited)?;
        return Ok(path);
    }
    Err(EditError::Invalid(format!(
        "no Service {namespace}/{name} in the manifests of {}",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelling_a_service_keeps_its_spec_and_every_other_document() {
        let dir = tempfile::tempdir().unwrap();
        let text = "# the shop\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop, annotations: {owner: team-a}}\nspec: {selector: {app: cart}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}\n---\n# keep me\napiVersion: v1\nkind: Service\nmetadata: {name: stock, namespace: shop}\nspec: {selector: {app: stock}, ports: [{port: 81}]}\n";
        let path = dir.path().join("shop.yaml");
        std::fs::write(&path, text).unwrap();
        let before = parse_file(text).unwrap();
        let written = label_service(dir.path(), "shop", "cart", "trellis.io/global", Some("true")).unwrap();
        assert_eq!(written, path);
        let after_text = std::fs::read_to_string(&path).unwrap();
        let after = parse_file(&after_text).unwrap();
        let key = crate::inventory::ObjectKey::new("shop", "cart");
        let (cart, _) = &after.services[&key];
        assert_eq!(cart.labels.get("trellis.io/global").map(String::as_str), Some("true"));
        let (old, _) = &before.services[&key];
        assert_eq!(
            (&cart.selector, &cart.ports, &cart.vips),
            (&old.selector, &old.ports, &old.vips),
            "the spec is kept"
        );
        assert!(after_text.contains("owner: team-a"), "{after_text}");
        assert!(
            after_text.starts_with("# the shop\n") && after_text.contains("# keep me\n"),
            "{after_text}"
        );
        let stock = crate::inventory::ObjectKey::new("shop", "stock");
        assert_eq!(
            after.services[&stock].0, before.services[&stock].0,
            "the other service is untouched"
        );
        label_service(dir.path(), "shop", "cart", "trellis.io/global", None).unwrap();
        let back = parse_file(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(back.services[&key].0.labels.is_empty());
        let e = label_service(dir.path(), "shop", "cart", "trellis.io/global", None).unwrap_err();
        assert!(e.to_string().contains("has no label"), "{e}");
        let e = label_service(dir.path(), "shop", "nope", "trellis.io/global", Some("true")).unwrap_err();
        assert!(e.to_string().contains("no Service shop/nope"), "{e}");
    }

    #[test]
    fn labelling_rewrites_only_the_namespace_document() {
        let dir = tempfile::tempdir().unwrap();
        let text = "# shop\napiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
        std::fs::write(dir.path().join("all.yaml"), text).unwrap();
        let path = label_namespace(dir.path(), "shop", "trellis.io/dataplane-mode", Some("ambient")).unwrap();
        let inv = parse_file(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(inv.namespaces["shop"].0.labels["trellis.io/dataplane-mode"], "ambient");
        assert_eq!(inv.services.len(), 1, "the other document is untouched");
        label_namespace(dir.path(), "shop", "trellis.io/dataplane-mode", None).unwrap();
        let inv = parse_file(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(inv.namespaces["shop"].0.labels.is_empty());
        let err = label_namespace(dir.path(), "shop", "trellis.io/dataplane-mode", None).unwrap_err();
        assert!(matches!(err, EditError::NoSuchLabel { .. }));
    }

    #[test]
    fn a_fifo_a_device_link_or_a_link_out_of_the_directory_is_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("shop.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        )
        .unwrap();
        let fifo =
            std::ffi::CString::new(dir.path().join("a-pipe.yaml").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("b-zero.yaml")).unwrap();
        // A namespace "other" outside the directory: found only if the link were followed.
        std::fs::write(
            outside.path().join("o.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path().join("o.yaml"), dir.path().join("c-out.yaml")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("d-linked-dir")).unwrap();
        // Would hang on the FIFO or fill memory from /dev/zero if either were read.
        let path = label_namespace(dir.path(), "shop", "x", Some("y")).unwrap();
        assert_eq!(path, dir.path().join("shop.yaml"));
        let written = label_namespace(dir.path(), "other", "x", Some("y")).unwrap();
        assert_eq!(
            written,
            dir.path().join("namespace-other.yaml"),
            "created inside, the outside file untouched"
        );
        assert!(!std::fs::read_to_string(outside.path().join("o.yaml"))
            .unwrap()
            .contains("x: y"));
    }

    #[test]
    fn every_byte_outside_the_namespace_document_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let service = "# shop\napiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {ports: [{port: 80}]}\n";
        let text = format!(
            "{service}--- # the namespace\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  annotations: {{owner: team-a}}\n\n# trailing comment\n"
        );
        let path = dir.path().join("all.yaml");
        std::fs::write(&path, &text).unwrap();
        label_namespace(dir.path(), "shop", "x", Some("true")).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        assert!(
            written.starts_with(&format!("{service}--- # the namespace\n")),
            "{written}"
        );
        assert!(written.ends_with("\n\n# trailing comment\n"), "{written}");
        let inv = parse_file(&written).unwrap_or_else(|e| panic!("{e}\n{written}"));
        assert_eq!(
            inv.namespaces["shop"].0.labels["x"], "true",
            "a value YAML would read as a bool stays a string"
        );
        assert!(written.contains("owner: team-a"), "annotations are kept: {written}");
    }

    #[test]
    fn a_root_on_the_marker_line_is_replaced_on_lines_of_its_own() {
        let text = "a: 1\n--- {kind: Namespace, metadata: {name: shop}}\n# end\n";
        let roots = document_roots(text).unwrap();
        let spliced = splice(text, roots[1].clone(), "kind: Namespace\nmetadata:\n  name: shop\n");
        assert_eq!(spliced, "a: 1\n---\nkind: Namespace\nmetadata:\n  name: shop\n# end\n");
    }

    #[test]
    fn document_roots_skip_markers_comments_and_empty_documents() {
        let text = "# c\na: 1\n---\n# only a comment\n--- # x\nb: [1, 2]\n\n# after\n...\n--- |\n  text\n";
        let roots: Vec<&str> = document_roots(text).unwrap().into_iter().map(|r| &text[r]).collect();
        assert_eq!(roots[..2], ["a: 1", "b: [1, 2]"]);
        assert_eq!(roots.len(), 3, "{roots:?}");
        let indented = "---\n  kind: Namespace\n  metadata: {name: shop}\n";
        let root = document_roots(indented).unwrap().remove(0);
        assert_eq!(&indented[root], "  kind: Namespace\n  metadata: {name: shop}");
    }

    #[test]
    fn a_missing_namespace_gets_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = label_namespace(dir.path(), "shop", "trellis.io/dataplane-mode", Some("ambient")).unwrap();
        assert_eq!(path, dir.path().join("namespace-shop.yaml"));
        assert!(parse_file(&std::fs::read_to_string(&path).unwrap()).is_ok());
    }

    #[test]
    fn bad_keys_values_and_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (ns, key, value) in [
            ("Shop", "a", "b"),
            ("shop", "", "b"),
            ("shop", "a b", "b"),
            ("shop", "a", "b c"),
            ("shop", "a", "-b"),
        ] {
            assert!(
                matches!(
                    label_namespace(dir.path(), ns, key, Some(value)),
                    Err(EditError::Invalid(_))
                ),
                "{ns} {key} {value}"
            );
        }
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing written"
        );
    }
}
