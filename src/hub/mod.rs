//! `--model org/name[@revision]`: Hugging Face Hub ids, resolved to a snapshot
//! folder of the standard hub cache before anything reads the model.
//!
//! [`resolve`] is the one entry point, called wherever `--model` is read
//! (`generate`, `bench`, `up`, `coordinator`, `worker`):
//! - a value naming an existing path is that path, as before (a folder wins
//!   over an id of the same spelling);
//! - a value shaped `org/name` or `org/name@revision` is a [`HubId`], looked up
//!   in the cache [`HubEnv`] finds (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!   `~/.cache/huggingface/hub`): `models--org--name/refs/<revision>` holds a
//!   commit hash (the revision may be the hash itself), and
//!   `models--org--name/snapshots/<hash>/` the files, most of them symlinks
//!   into `../../blobs/` (which `model_file` accepts);
//! - anything else is returned unchanged, so today's errors stay.
//!
//! A snapshot holding `config.json`, `tokenizer.json` and every safetensors
//! file of the checkpoint is used as is, with no network. Otherwise, unless
//! `HF_HUB_OFFLINE` is set, what is missing is downloaded ([`download`]). The
//! resolved snapshot path is what flows on: the coordinator hands that same
//! path to the workers `up` starts.
//!
//! ```ignore
//! let dir = hub::resolve(Path::new("acme/stories@main"))?;
//! // ~/.cache/huggingface/hub/models--acme--stories/snapshots/<hash>
//! ```
mod download;

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use zeroshard_offload::model_file;

const CONFIG: &str = "config.json";
const GENERATION_CONFIG: &str = "generation_config.json";
const TOKENIZER: &str = "tokenizer.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// The checkpoint as `Checkpoint::open` reads it: this file, else the index
/// and the shards its `weight_map` names.
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// `--model` as given → the folder to read: an existing path, a Hub id's
/// snapshot folder (downloaded first when needed and allowed), or the value
/// unchanged.
pub(crate) fn resolve(model: &Path) -> Result<PathBuf> {
    if std::fs::symlink_metadata(model).is_ok() {
        return Ok(model.to_path_buf());
    }
    let Some(id) = model.to_str().and_then(HubId::parse) else {
        return Ok(model.to_path_buf());
    };
    let context = || format!("--model {id} (no such folder; read as a Hugging Face id)");
    let env = HubEnv::from_vars(|name| std::env::var(name).ok()).with_context(context)?;
    resolve_id(&id, &env).with_context(context)
}

/// The Hub repository `model` names (`org/name`), when it is read as an id
/// (no such path, and the id's syntax).
pub(crate) fn id_of(model: &Path) -> Option<String> {
    if std::fs::symlink_metadata(model).is_ok() {
        return None;
    }
    model.to_str().and_then(HubId::parse).map(|id| id.repo)
}

fn resolve_id(id: &HubId, env: &HubEnv) -> Result<PathBuf> {
    let found = lookup(&env.cache, id)?;
    let usable = match &found {
        Lookup::Found { dir, missing } if missing.is_empty() => return Ok(dir.clone()),
        // Not every model has a tokenizer.json; what it has suffices.
        Lookup::Found { dir, missing } if missing.iter().all(|m| m == TOKENIZER) => Some(dir.clone()),
        _ => None,
    };
    if env.offline {
        return match (&found, usable) {
            (_, Some(dir)) => Ok(dir),
            (Lookup::Found { dir, missing }, None) => bail!(
                "its snapshot {} lacks {}, and HF_HUB_OFFLINE is set, so nothing is downloaded",
                dir.display(),
                missing.join(", ")
            ),
            (Lookup::Absent, None) => bail!(
                "not in the hub cache {} (no {}); HF_HUB_OFFLINE is set, so nothing is downloaded",
                env.cache.display(),
                id.ref_path().display()
            ),
        };
    }
    match (download::fetch(id, env), usable) {
        (Ok(dir), _) => Ok(dir),
        (Err(e), Some(dir)) => {
            tracing::warn!("{id}: {e:#}; using the cached snapshot {} as it is", dir.display());
            Ok(dir)
        }
        (Err(e), None) => Err(e),
    }
}

/// `org/name` and a revision (`main` unless given as `org/name@revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// `org/name[@revision]`, with the Hub's rules for names (letters, digits,
    /// `-`, `_`, `.`; 1–96 of them; no `--` or `..`; starting and ending with a
    /// letter, digit or `_`) and a revision that stays inside `refs/`.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (repo, revision) = match s.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev)),
            None => (s, None),
        };
        let (org, name) = repo.split_once('/')?;
        if !is_repo_part(org) || !is_repo_part(name) {
            return None;
        }
        let revision = revision.unwrap_or("main");
        if !is_revision(revision) {
            return None;
        }
        Some(Self { repo: repo.to_string(), revision: revision.to_string() })
    }

    /// `models--org--name`: the repository's folder in the cache.
    fn folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }

    /// `models--org--name/refs/<revision>`, relative to the cache.
    fn ref_path(&self) -> PathBuf {
        Path::new(&self.folder()).join("refs").join(&self.revision)
    }
}

impl fmt::Display for HubId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

fn is_repo_part(s: &str) -> bool {
    let edge = |c: char| c.is_ascii_alphanumeric() || c == '_';
    (1..=96).contains(&s.len())
        && s.chars().all(|c| edge(c) || c == '-' || c == '.')
        && s.starts_with(edge)
        && s.ends_with(edge)
        && !s.contains("--")
        && !s.contains("..")
}

/// A branch, tag or commit: `/`-separated plain names (e.g. `refs/pr/1`).
fn is_revision(s: &str) -> bool {
    s.split('/').all(|part| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part.chars().all(|c| c.is_ascii_graphic() && c != '\\' && c != '@')
    })
}

/// A full commit hash, as the cache names snapshots.
fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where the hub cache is and how to reach the Hub, from the variables the
/// Python `huggingface_hub` reads.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HubEnv {
    pub cache: PathBuf,
    /// `HF_HUB_OFFLINE` is 1, on, yes or true: the cache only.
    pub offline: bool,
    /// `HF_ENDPOINT`, else `https://huggingface.co` (no trailing `/`).
    pub endpoint: String,
    /// `HF_TOKEN` as given (read only when downloading).
    token: Option<String>,
    /// `HF_TOKEN_PATH`, else `$HF_HOME/token` (what `hf auth login` writes).
    token_path: Option<PathBuf>,
}

impl HubEnv {
    pub(crate) fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let set = |name: &str| var(name).filter(|v| !v.is_empty());
        let home = set("HOME").map(PathBuf::from);
        let path = |name: &str| set(name).map(|v| expand_home(&v, home.as_deref()));
        let hf_home = path("HF_HOME")
            .or_else(|| path("XDG_CACHE_HOME").map(|x| x.join("huggingface")))
            .or_else(|| home.as_ref().map(|h| h.join(".cache/huggingface")));
        let Some(cache) = path("HF_HUB_CACHE").or_else(|| hf_home.as_ref().map(|h| h.join("hub"))) else {
            bail!("no hub cache: set HF_HUB_CACHE or HF_HOME (HOME is not set either)");
        };
        Ok(Self {
            cache,
            offline: set("HF_HUB_OFFLINE").is_some_and(|v| {
                ["1", "ON", "YES", "TRUE"].contains(&v.trim().to_ascii_uppercase().as_str())
            }),
            endpoint: set("HF_ENDPOINT").map_or_else(
                || "https://huggingface.co".to_string(),
                |e| e.trim_end_matches('/').to_string(),
            ),
            token: set("HF_TOKEN"),
            token_path: path("HF_TOKEN_PATH").or_else(|| hf_home.map(|h| h.join("token"))),
        })
    }

    /// `HF_TOKEN`, else the first line of the token file, if any.
    fn token(&self) -> Option<String> {
        let from_file = || {
            let text = std::fs::read_to_string(self.token_path.as_ref()?).ok()?;
            Some(text.lines().next()?.trim().to_string()).filter(|t| !t.is_empty())
        };
        self.token.clone().or_else(from_file)
    }
}

/// `~` and `~/…` as the shell would expand them (variables set in scripts and
/// unit files are often left unexpanded).
fn expand_home(value: &str, home: Option<&Path>) -> PathBuf {
    match (value.strip_prefix('~'), home) {
        (Some(rest), Some(home)) if rest.is_empty() || rest.starts_with('/') => {
            home.join(rest.trim_start_matches('/'))
        }
        _ => PathBuf::from(value),
    }
}

/// What the cache holds for an id.
#[derive(Debug, PartialEq)]
enum Lookup {
    /// No snapshot for this revision.
    Absent,
    /// Its snapshot folder and the files the model needs that it lacks.
    Found { dir: PathBuf, missing: Vec<String> },
}

fn lookup(cache: &Path, id: &HubId) -> Result<Lookup> {
    let repo = cache.join(id.folder());
    let ref_path = cache.join(id.ref_path());
    let hash = match std::fs::read_to_string(&ref_path) {
        Ok(text) => {
            let hash = text.trim();
            if !is_commit_hash(hash) {
                bail!("{} does not hold a commit hash", ref_path.display());
            }
            hash.to_string()
        }
        Err(_) if is_commit_hash(&id.revision) => id.revision.clone(),
        Err(_) => return Ok(Lookup::Absent),
    };
    let dir = repo.join("snapshots").join(&hash);
    if !dir.is_dir() {
        return Ok(Lookup::Absent);
    }
    let missing = missing_files(&dir);
    Ok(Lookup::Found { dir, missing })
}

/// The files of `dir` the model needs that are absent (a dangling symlink, a
/// blob since removed, counts as absent).
fn missing_files(dir: &Path) -> Vec<String> {
    let absent = |name: &str| !dir.join(name).exists();
    let mut missing: Vec<String> =
        [CONFIG, TOKENIZER].into_iter().filter(|n| absent(n)).map(String::from).collect();
    if !absent(SINGLE) {
        return missing;
    }
    if absent(INDEX) {
        missing.push(format!("{SINGLE} (or {INDEX})"));
        return missing;
    }
    // An index that does not parse is the loader's to report, naming the file.
    let shards = model_file::read(dir, INDEX)
        .and_then(|bytes| zeroshard_offload::parse_index(&dir.join(INDEX), &bytes))
        .unwrap_or_default();
    missing.extend(shards.into_iter().filter(|n| absent(n)));
    missing
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::symlink;

    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

    fn id(s: &str) -> HubId {
        HubId::parse(s).unwrap_or_else(|| panic!("{s} parses"))
    }

    #[test]
    fn hub_ids_and_what_is_not_one() {
        assert_eq!(id("acme/stories"), HubId { repo: "acme/stories".into(), revision: "main".into() });
        assert_eq!(id("meta-llama/Llama-3.1-8B@v1").revision, "v1");
        assert_eq!(id("a_b/c.d@refs/pr/1").revision, "refs/pr/1");
        assert_eq!(id(&format!("acme/stories@{HASH}")).revision, HASH);
        assert_eq!(id("acme/stories").ref_path(), Path::new("models--acme--stories/refs/main"));
        for not_id in [
            "stories",
            "/abs/path",
            "./acme/x",
            "acme/x/y",
            "acme/",
            "/x",
            "a--b/c",
            "a/b..c",
            "-a/b",
            "a/b-",
            "a/b@",
            "a/b@../x",
            "a/b@x//y",
            "a/b@/x",
            "a b/c",
            "~/models",
            "a/b@x@y",
        ] {
            assert_eq!(HubId::parse(not_id), None, "{not_id}");
        }
        assert!(HubId::parse(&format!("a/{}", "x".repeat(97))).is_none());
    }

    fn env(vars: &[(&str, &str)]) -> Result<HubEnv> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubEnv::from_vars(|k| vars.get(k).cloned())
    }

    #[test]
    fn cache_location_follows_huggingface_hub() {
        let cache = |vars: &[(&str, &str)]| env(vars).expect("env").cache;
        assert_eq!(cache(&[("HOME", "/h")]), Path::new("/h/.cache/huggingface/hub"));
        assert_eq!(cache(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]), Path::new("/x/huggingface/hub"));
        assert_eq!(
            cache(&[("HOME", "/h"), ("HF_HOME", "/hf"), ("XDG_CACHE_HOME", "/x")]),
            Path::new("/hf/hub")
        );
        assert_eq!(cache(&[("HF_HOME", "~/hf"), ("HOME", "/h")]), Path::new("/h/hf/hub"));
        assert_eq!(cache(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/c")]), Path::new("/c"));
        assert_eq!(cache(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "")]), Path::new("/c"));
        let e = env(&[]).expect_err("nowhere").to_string();
        assert!(e.contains("HF_HUB_CACHE"), "{e}");
        let e = env(&[("HOME", "/h"), ("HF_HOME", "/hf")]).expect("env");
        assert_eq!(e.token_path.as_deref(), Some(Path::new("/hf/token")));
        assert_eq!(e.endpoint, "https://huggingface.co");
        let e = env(&[("HOME", "/h"), ("HF_TOKEN_PATH", "/t"), ("HF_ENDPOINT", "http://mirror:8080/")]);
        let e = e.expect("env");
        assert_eq!(
            (e.token_path.as_deref(), e.endpoint.as_str()),
            (Some(Path::new("/t")), "http://mirror:8080")
        );
    }

    #[test]
    fn offline_takes_the_values_huggingface_hub_takes() {
        for (value, offline) in
            [("1", true), ("true", true), ("ON", true), ("yes", true), ("0", false), ("", false)]
        {
            let e = env(&[("HOME", "/h"), ("HF_HUB_OFFLINE", value)]).expect("env");
            assert_eq!(e.offline, offline, "{value:?}");
        }
    }

    #[test]
    fn token_from_the_variable_else_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let home = dir.path().to_str().expect("utf-8");
        assert_eq!(env(&[("HF_HOME", home)]).expect("env").token(), None);
        std::fs::write(dir.path().join("token"), "hf_file\n").expect("write");
        assert_eq!(env(&[("HF_HOME", home)]).expect("env").token().as_deref(), Some("hf_file"));
        let e = env(&[("HF_HOME", home), ("HF_TOKEN", "hf_var")]).expect("env");
        assert_eq!(e.token().as_deref(), Some("hf_var"));
    }

    /// A cache with `models--acme--stories`, ref `main` → HASH, and the
    /// snapshot files `names` as symlinks into blobs/.
    fn cache_with(names: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let cache = tempfile::tempdir().expect("tmp");
        let repo = cache.path().join("models--acme--stories");
        let snap = repo.join("snapshots").join(HASH);
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::create_dir_all(repo.join("blobs")).expect("mkdir");
        std::fs::create_dir_all(&snap).expect("mkdir");
        std::fs::write(repo.join("refs/main"), HASH).expect("write");
        for (i, name) in names.iter().enumerate() {
            let body = if *name == INDEX {
                r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#
            } else {
                "{}"
            };
            std::fs::write(repo.join(format!("blobs/b{i}")), body).expect("write");
            symlink(format!("../../blobs/b{i}"), snap.join(name)).expect("symlink");
        }
        (cache, snap)
    }

    #[test]
    fn lookup_finds_snapshots_by_ref_or_hash_and_lists_what_is_missing() {
        let (cache, snap) = cache_with(&[CONFIG, TOKENIZER, SINGLE]);
        let found = |rev: &str| lookup(cache.path(), &id(&format!("acme/stories@{rev}"))).expect("lookup");
        assert_eq!(found("main"), Lookup::Found { dir: snap.clone(), missing: vec![] });
        assert_eq!(found(HASH), Lookup::Found { dir: snap.clone(), missing: vec![] });
        assert_eq!(found("v1"), Lookup::Absent);
        assert_eq!(lookup(cache.path(), &id("acme/other")).expect("lookup"), Lookup::Absent);
        std::fs::write(cache.path().join("models--acme--stories/refs/v1"), "../../etc").expect("write");
        let e = lookup(cache.path(), &id("acme/stories@v1")).expect_err("not a hash").to_string();
        assert!(e.contains("refs/v1 does not hold a commit hash"), "{e}");

        let (cache, snap) = cache_with(&[TOKENIZER]);
        let missing = vec![CONFIG.to_string(), format!("{SINGLE} (or {INDEX})")];
        assert_eq!(
            lookup(cache.path(), &id("acme/stories")).expect("lookup"),
            Lookup::Found { dir: snap, missing }
        );

        let (cache, snap) = cache_with(&[CONFIG, INDEX, "s1.safetensors"]);
        let missing = vec![TOKENIZER.to_string(), "s2.safetensors".to_string()];
        assert_eq!(
            lookup(cache.path(), &id("acme/stories")).expect("lookup"),
            Lookup::Found { dir: snap, missing }
        );
    }

    #[test]
    fn offline_uses_a_snapshot_without_tokenizer_and_refuses_an_incomplete_one() {
        let offline = |cache: &Path| HubEnv {
            cache: cache.to_path_buf(),
            offline: true,
            endpoint: String::new(),
            token: None,
            token_path: None,
        };
        let (cache, snap) = cache_with(&[CONFIG, SINGLE]);
        assert_eq!(resolve_id(&id("acme/stories"), &offline(cache.path())).expect("usable"), snap);
        std::fs::remove_file(cache.path().join("models--acme--stories/blobs/b1")).expect("rm blob");
        let e = resolve_id(&id("acme/stories"), &offline(cache.path())).expect_err("no weights").to_string();
        assert!(
            e.contains("lacks tokenizer.json, model.safetensors (or") && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        let e = resolve_id(&id("acme/none@v2"), &offline(cache.path())).expect_err("absent").to_string();
        let want = format!("not in the hub cache {} (no models--acme--none/refs/v2)", cache.path().display());
        assert!(e.starts_with(&want), "{e}");
    }
}
