//! Manifest-directory source: multi-document YAML files of Services, EndpointSlices, Nodes and
//! ServiceCIDRs (`kubectl get -o yaml` output, `List`s included), followed while running.
//!
//! Each file is parsed as a whole: if any document in it fails, the error names the file, the
//! document index and the reason, and the file's last good content stays in force, so a
//! half-saved edit never removes services.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::model::{Kind, ObjectRef};
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
    Ok(parse_hashed(file, text)?.into_iter().map(|(obj, _)| obj).collect())
}

/// [`parse_file`], with a hash of each object's document: what a rescan compares to re-apply
/// only the objects an edit changed.
fn parse_hashed(file: &Path, text: &str) -> Result<Vec<(Object, u64)>, ManifestError> {
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

fn collect(value: serde_yaml_ng::Value, out: &mut Vec<(Object, u64)>) -> Result<(), String> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let kind = field("kind").ok_or("missing kind")?;
    let api_version = field("apiVersion").ok_or("missing apiVersion")?;
    let name = name_of(&value);
    let typed = |e: serde_yaml_ng::Error| format!("{kind} {name}: {e}");
    let hash = if kind == "List" { 0 } else { content_hash(&value) };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = value.get("items").and_then(|v| v.as_sequence()).cloned().unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                collect(item, out).map_err(|e| format!("items[{i}]: {e}"))?;
            }
        }
        ("v1", "Service") => out.push((
            Object::Service(std::sync::Arc::new(serde_yaml_ng::from_value(value).map_err(typed)?)),
            hash,
        )),
        ("v1", "Node") => out.push((
            Object::Node(std::sync::Arc::new(serde_yaml_ng::from_value(value).map_err(typed)?)),
            hash,
        )),
        ("discovery.k8s.io/v1", "EndpointSlice") => out.push((
            Object::EndpointSlice(std::sync::Arc::new(serde_yaml_ng::from_value(value).map_err(typed)?)),
            hash,
        )),
        ("networking.k8s.io/v1", "ServiceCIDR") => out.push((
            Object::ServiceCidr(std::sync::Arc::new(serde_yaml_ng::from_value(value).map_err(typed)?)),
            hash,
        )),
        (api, kind) => debug!(api, kind, "ignoring manifest of a kind ferry does not read"),
    }
    Ok(())
}

fn content_hash(value: &serde_yaml_ng::Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
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
    /// The objects of the file's last good content, by the hash of their document: the objects
    /// themselves live in the store; keeping a second copy here cost 50 MiB at 10,000 services.
    objects: HashMap<ObjectRef, u64>,
}

/// The last good content of every file in a manifest directory, as object identities.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Errors since the start, for metrics.
    pub errors_total: u64,
}

/// What one or more rescans found, in the order found: an object to apply (new or changed
/// document) or to delete (gone from every file). Later findings replace earlier ones.
#[derive(Debug, Default)]
pub struct Scan {
    found: Vec<(ObjectRef, Option<Object>)>,
    index: HashMap<ObjectRef, usize>,
}

impl Scan {
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    fn apply(&mut self, obj: Object) {
        self.put(obj.object_ref(), Some(obj));
    }

    fn delete(&mut self, r: ObjectRef) {
        self.put(r, None);
    }

    fn put(&mut self, r: ObjectRef, obj: Option<Object>) {
        match self.index.get(&r) {
            Some(&i) => self.found[i].1 = obj,
            None => {
                self.index.insert(r.clone(), self.found.len());
                self.found.push((r, obj));
            }
        }
    }

    /// Adds a later scan's findings.
    pub fn merge(&mut self, later: Scan) {
        for (r, obj) in later.found {
            self.put(r, obj);
        }
    }

    /// The findings as one store update: a [`StoreEvent::Replace`] of every kind for the first
    /// load (what is not in the directory does not exist), a [`StoreEvent::Batch`] after.
    pub fn into_event(self, first: bool) -> StoreEvent {
        if first {
            let objects = self.found.into_iter().filter_map(|(_, obj)| obj).collect();
            return StoreEvent::Replace { kinds: ALL_KINDS.to_vec(), objects };
        }
        StoreEvent::Batch(
            self.found
                .into_iter()
                .map(|(r, obj)| obj.map_or(StoreEvent::Delete(r), StoreEvent::Apply))
                .collect(),
        )
    }
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), files: BTreeMap::new(), errors_total: 0 }
    }

    /// Re-reads files whose size or modification time changed. Returns the objects to apply
    /// and delete, and every error met (each also logged). An object defined by two files is
    /// applied from whichever changed last and deleted only when no file defines it.
    pub fn rescan(&mut self) -> Result<(Scan, Vec<ManifestError>), ManifestError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|source| ManifestError::Dir { dir: self.dir.clone(), source })?;
        let mut seen = HashSet::new();
        let mut scan = Scan::default();
        let mut gone: Vec<ObjectRef> = Vec::new();
        let mut errors = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            let Ok(meta) = entry.metadata() else { continue };
            if !is_yaml || !meta.is_file() {
                continue;
            }
            seen.insert(path.clone());
            let stamp = Stamp { modified: meta.modified().ok(), len: meta.len() };
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|source| ManifestError::Read { file: path.clone(), source })
                .and_then(|text| parse_hashed(&path, &text));
            match parsed {
                Ok(parsed) => {
                    debug!(file = %path.display(), objects = parsed.len(), "manifest file read");
                    let mut old = self.files.remove(&path).map(|f| f.objects).unwrap_or_default();
                    let mut objects = HashMap::with_capacity(parsed.len());
                    for (obj, hash) in parsed {
                        let r = obj.object_ref();
                        if old.remove(&r) != Some(hash) {
                            scan.apply(obj);
                        }
                        objects.insert(r, hash);
                    }
                    gone.extend(old.into_keys());
                    self.files.insert(path, FileState { stamp, objects });
                }
                Err(e) => {
                    error!("{e}; keeping the file's last good content");
                    self.errors_total += 1;
                    // Remember the stamp so the same broken content is reported once.
                    match self.files.get_mut(&path) {
                        Some(f) => f.stamp = stamp,
                        None => {
                            self.files.insert(path, FileState { stamp, objects: HashMap::new() });
                        }
                    }
                    errors.push(e);
                }
            }
        }
        let removed: Vec<PathBuf> = self.files.keys().filter(|p| !seen.contains(*p)).cloned().collect();
        for path in removed {
            if let Some(f) = self.files.remove(&path) {
                gone.extend(f.objects.into_keys());
            }
        }
        for r in gone {
            if !self.files.values().any(|f| f.objects.contains_key(&r)) {
                scan.delete(r);
            }
        }
        Ok((scan, errors))
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }
}

/// Reads a directory once: for `render` and `trace`.
pub fn load_once(dir: &Path) -> Result<(StoreEvent, Vec<ManifestError>), ManifestError> {
    let mut m = ManifestDir::new(dir);
    let (scan, errors) = m.rescan()?;
    Ok((scan.into_event(true), errors))
}

/// Follows a directory: sends the whole directory at start, then the objects each change
/// applies or deletes, once the directory has been quiet for `debounce` (an editor's save is
/// often several writes).
pub async fn follow(dir: PathBuf, poll: Duration, debounce: Duration, tx: mpsc::Sender<StoreEvent>) {
    let mut m = ManifestDir::new(&dir);
    let mut first = true;
    loop {
        match m.rescan() {
            Ok((mut scan, _)) if !scan.is_empty() || first => {
                // Wait until a rescan shows no further change.
                loop {
                    tokio::time::sleep(debounce).await;
                    match m.rescan() {
                        Ok((later, _)) if !later.is_empty() => scan.merge(later),
                        Ok(_) | Err(_) => break,
                    }
                }
                if first {
                    info!(dir = %dir.display(), files = m.file_count(), "manifest directory loaded");
                }
                let event = scan.into_event(first);
                first = false;
                if tx.send(event).await.is_err() {
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

    fn svc(name: &str, port: u16) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: d}}\n\
             spec: {{clusterIP: 10.96.0.1, ports: [{{port: {port}}}]}}\n"
        )
    }

    /// (applied names, deleted names) of a scan's event.
    fn names(scan: Scan) -> (Vec<String>, Vec<String>) {
        let StoreEvent::Batch(events) = scan.into_event(false) else { panic!("a batch") };
        let (mut applied, mut deleted) = (Vec::new(), Vec::new());
        for e in events {
            match e {
                StoreEvent::Apply(o) => applied.push(o.object_ref().name),
                StoreEvent::Delete(r) => deleted.push(r.name),
                other => panic!("unexpected {other:?}"),
            }
        }
        (applied, deleted)
    }

    #[test]
    fn a_rescan_reports_only_the_objects_an_edit_changed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.yaml");
        std::fs::write(&f, svc("one", 80) + &svc("two", 80) + &svc("three", 80)).unwrap();
        let mut m = ManifestDir::new(dir.path());
        let (scan, errors) = m.rescan().unwrap();
        assert!(errors.is_empty());
        let StoreEvent::Replace { objects, .. } = scan.into_event(true) else { panic!("a replace") };
        assert_eq!(objects.len(), 3);

        // `two` changes, `three` goes: one apply, one delete, `one` untouched.
        std::fs::write(&f, svc("one", 80) + &svc("two", 8080)).unwrap();
        assert_eq!(names(m.rescan().unwrap().0), (vec!["two".to_owned()], vec!["three".to_owned()]));
        assert!(m.rescan().unwrap().0.is_empty(), "nothing changed since");
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_content_and_a_removed_file_deletes_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        std::fs::write(&a, svc("one", 80)).unwrap();
        std::fs::write(&b, svc("two", 80) + &svc("one", 80)).unwrap();
        let mut m = ManifestDir::new(dir.path());
        m.rescan().unwrap();

        std::fs::write(&a, svc("one", 80) + "---\napiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: eighty}]}\n").unwrap();
        let (scan, errors) = m.rescan().unwrap();
        assert_eq!(errors.len(), 1);
        assert!(scan.is_empty(), "a broken file changes nothing");

        std::fs::remove_file(&b).unwrap();
        let (applied, deleted) = names(m.rescan().unwrap().0);
        assert!(applied.is_empty());
        assert_eq!(deleted, vec!["two".to_owned()], "`one` is still defined by a.yaml");
    }

    #[test]
    fn merged_scans_keep_the_last_finding_per_object() {
        let r = |name: &str| ObjectRef::new(Kind::Service, Some("d"), Some(name));
        let obj = |name: &str| parse_file(Path::new("f.yaml"), &svc(name, 80)).unwrap().remove(0);
        let mut first = Scan::default();
        first.apply(obj("a"));
        first.delete(r("b"));
        let mut later = Scan::default();
        later.delete(r("a"));
        later.apply(obj("b"));
        first.merge(later);
        assert_eq!(names(first), (vec!["b".to_owned()], vec!["a".to_owned()]));
    }
}
