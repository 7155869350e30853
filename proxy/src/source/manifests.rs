//! Manifest-directory source: multi-document YAML files of Services, EndpointSlices, Nodes and
//! ServiceCIDRs (`kubectl get -o yaml` output, `List`s included), followed while running.
//!
//! Each file is parsed as a whole: if any document in it fails, the error names the file, the
//! document index and the reason, and the file's last good content stays in force, so a
//! half-saved edit never removes services.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::model::Kind;
use crate::store::{Object, StoreEvent};

const ALL_KINDS: [Kind; 4] = [Kind::Service, Kind::EndpointSlice, Kind::Node, Kind::ServiceCIDR];

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: document {document}: {reason}")]
    Document { file: PathBuf, document: usize, reason: String },
    #[error("{dir}: cannot list manifest directory: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
}

/// Parses the text of one manifest file into objects. Documents of kinds ferry doesn't read are
/// skipped (with a debug line); anything malformed fails the whole file.
pub fn parse_file(file: &Path, text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut out = Vec::new();
    for (index, doc) in documents(text).into_iter().enumerate() {
        let err = |reason: String| ManifestError::Document { file: file.to_owned(), document: index, reason };
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).map_err(|e| err(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        collect(value, &mut out).map_err(err)?;
    }
    Ok(out)
}

/// Splits a multi-document stream at `---` lines, so each document is parsed on its own: the
/// YAML parser reads a whole stream into memory before yielding the first document, which for
/// a 10,000-service file costs hundreds of MiB. Text before a leading `---` that holds nothing
/// is not a document.
fn documents(text: &str) -> Vec<&str> {
    let mut bounds = vec![0];
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end();
        if (bare == "---" || bare.starts_with("--- ")) && offset > 0 {
            bounds.push(offset);
        }
        offset += line.len();
    }
    bounds.push(text.len());
    let mut docs: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    let only_comments = |d: &str| d.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if docs.len() > 1 && docs.first().is_some_and(|d| only_comments(d)) {
        docs.remove(0);
    }
    docs
}

fn collect(value: serde_yaml_ng::Value, out: &mut Vec<Object>) -> Result<(), String> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let kind = field("kind").ok_or("missing kind")?;
    let api_version = field("apiVersion").ok_or("missing apiVersion")?;
    let name = name_of(&value);
    let typed = |e: serde_yaml_ng::Error| format!("{kind} {name}: {e}");
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = value.get("items").and_then(|v| v.as_sequence()).cloned().unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                collect(item, out).map_err(|e| format!("items[{i}]: {e}"))?;
            }
        }
        ("v1", "Service") => {
            out.push(Object::Service(std::sync::Arc::new(serde_yaml_ng::from_value(value).map_err(typed)?)))
        }
        ("v1", "Node") => {
            out.push(Object::Node(std::sync::Arc::new(serde_yaml_ng::from_value(value).map_err(typed)?)))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => out.push(Object::EndpointSlice(std::sync::Arc::new(
            serde_yaml_ng::from_value(value).map_err(typed)?,
        ))),
        ("networking.k8s.io/v1", "ServiceCIDR") => out
            .push(Object::ServiceCidr(std::sync::Arc::new(serde_yaml_ng::from_value(value).map_err(typed)?))),
        (api, kind) => debug!(api, kind, "ignoring manifest of a kind ferry does not read"),
    }
    Ok(())
}

fn name_of(value: &serde_yaml_ng::Value) -> String {
    let meta = value.get("metadata");
    let get = |k: &str| meta.and_then(|m| m.get(k)).and_then(|v| v.as_str()).unwrap_or("");
    match (get("namespace"), get("name")) {
        ("", name) => name.to_owned(),
        (ns, name) => format!("{ns}/{name}"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    objects: Vec<Object>,
}

/// The last good content of every file in a manifest directory.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Errors since the start, for metrics.
    pub errors_total: u64,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), files: BTreeMap::new(), errors_total: 0 }
    }

    /// Re-reads files whose size or modification time changed. Returns whether anything
    /// changed, and every error met (each also logged).
    pub fn rescan(&mut self) -> Result<(bool, Vec<ManifestError>), ManifestError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|source| ManifestError::Dir { dir: self.dir.clone(), source })?;
        let mut seen = Vec::new();
        let mut changed = false;
        let mut errors = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            let Ok(meta) = entry.metadata() else { continue };
            if !is_yaml || !meta.is_file() {
                continue;
            }
            seen.push(path.clone());
            let stamp = Stamp { modified: meta.modified().ok(), len: meta.len() };
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|source| ManifestError::Read { file: path.clone(), source })
                .and_then(|text| parse_file(&path, &text));
            match parsed {
                Ok(objects) => {
                    debug!(file = %path.display(), objects = objects.len(), "manifest file read");
                    self.files.insert(path, FileState { stamp, objects });
                    changed = true;
                }
                Err(e) => {
                    error!("{e}; keeping the file's last good content");
                    self.errors_total += 1;
                    // Remember the stamp so the same broken content is reported once.
                    match self.files.get_mut(&path) {
                        Some(f) => f.stamp = stamp,
                        None => {
                            self.files.insert(path, FileState { stamp, objects: Vec::new() });
                        }
                    }
                    errors.push(e);
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        changed |= before != self.files.len();
        Ok((changed, errors))
    }

    /// Every object of every file's last good content.
    pub fn objects(&self) -> Vec<Object> {
        self.files.values().flat_map(|f| f.objects.iter().cloned()).collect()
    }

    /// The whole directory as one atomic store update.
    pub fn snapshot(&self) -> StoreEvent {
        StoreEvent::Replace { kinds: ALL_KINDS.to_vec(), objects: self.objects() }
    }
}

/// Reads a directory once: for `render` and `trace`.
pub fn load_once(dir: &Path) -> Result<(StoreEvent, Vec<ManifestError>), ManifestError> {
    let mut m = ManifestDir::new(dir);
    let (_, errors) = m.rescan()?;
    Ok((m.snapshot(), errors))
}

/// Follows a directory: sends a snapshot at start and after every change, once the directory
/// has been quiet for `debounce` (an editor's save is often several writes).
pub async fn follow(dir: PathBuf, poll: Duration, debounce: Duration, tx: mpsc::Sender<StoreEvent>) {
    let mut m = ManifestDir::new(&dir);
    let mut first = true;
    loop {
        match m.rescan() {
            Ok((changed, _)) if changed || first => {
                // Wait until a rescan shows no further change.
                loop {
                    tokio::time::sleep(debounce).await;
                    match m.rescan() {
                        Ok((false, _)) | Err(_) => break,
                        Ok((true, _)) => continue,
                    }
                }
                if first {
                    info!(dir = %dir.display(), files = m.files.len(), "manifest directory loaded");
                }
                first = false;
                if tx.send(m.snapshot()).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => warn!("{e}"),
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_documents_and_multi_docs_are_read() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a, namespace: d}\n  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n";
        let objs = parse_file(Path::new("f.yaml"), text).unwrap();
        assert_eq!(objs.len(), 1);
    }

    #[test]
    fn documents_split_at_markers_like_the_yaml_stream() {
        assert_eq!(documents("a: 1\n---\nb: 2\n"), vec!["a: 1\n", "---\nb: 2\n"]);
        assert_eq!(documents("---\na: 1\n---\nb: 2\n").len(), 2);
        assert_eq!(
            documents("# c\n---\na: 1\n").len(),
            1,
            "a comment before the first marker is no document"
        );
        assert_eq!(documents("a: |\n  x\n  ---\n").len(), 1, "indented --- is content");
    }

    #[test]
    fn malformed_document_error_names_file_and_index() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: eighty}]}\n";
        let err = parse_file(Path::new("svc.yaml"), text).unwrap_err().to_string();
        assert!(err.starts_with("svc.yaml: document 1: Service b:"), "{err}");
    }
}
