//! Downloading what a model needs into the hub cache, with hf-hub's blocking
//! (ureq) client: `config.json`, `generation_config.json`, `tokenizer.json` and
//! `tokenizer_config.json` where the repository has them, and the checkpoint
//! as `Checkpoint::open` reads it (`model.safetensors`, else the index and the
//! shards it names; other `*.safetensors`, such as a repository's second
//! consolidated copy, are not fetched).
//!
//! The revision is turned into its commit once and every file is fetched at
//! that commit, so a branch that moves meanwhile cannot mix two snapshots;
//! `refs/<revision>` is then written as the Python client writes it. Files the
//! snapshot already has are not fetched again. Progress bars show on a
//! terminal; `HF_ENDPOINT` and `HF_TOKEN` (or the token file) apply.
use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use super::{
    is_commit_hash, HubEnv, HubId, CONFIG, GENERATION_CONFIG, INDEX, SINGLE, TOKENIZER, TOKENIZER_CONFIG,
};

/// Fetches what the snapshot of `id` lacks; returns the snapshot folder.
pub(super) fn fetch(id: &HubId, env: &HubEnv) -> Result<PathBuf> {
    let api = ApiBuilder::from_cache(Cache::new(env.cache.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token())
        .with_progress(std::io::stderr().is_terminal())
        .build()
        .map_err(|e| explain(e, env, "setting up the download"))?;
    let repo =
        |revision: &str| api.repo(Repo::with_revision(id.repo.clone(), RepoType::Model, revision.into()));
    let info = repo(&id.revision).info().map_err(|e| explain(e, env, "asking for its files"))?;
    let sha = info.sha;
    if !is_commit_hash(&sha) {
        bail!(
            "{} answered \"{sha}\" for the commit of revision {}, not a commit hash",
            env.endpoint,
            id.revision
        );
    }
    let remote: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    if !remote.contains(CONFIG) {
        bail!("commit {sha} has no {CONFIG}");
    }
    let folder = env.cache.join(id.folder());
    let snapshot = folder.join("snapshots").join(&sha);
    let sha_ref = folder.join("refs").join(&sha);
    let had_sha_ref = sha_ref.exists();
    let pinned = repo(&sha);
    let get = |name: &str| -> Result<()> {
        let path = snapshot.join(name);
        if path.exists() {
            return Ok(());
        }
        if std::fs::symlink_metadata(&path).is_ok() {
            // A symlink whose blob is gone: hf-hub would not replace it.
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        pinned.download(name).map_err(|e| explain(e, env, &format!("downloading {name}")))?;
        Ok(())
    };
    let mut names: Vec<String> = [CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG]
        .into_iter()
        .filter(|n| remote.contains(n))
        .map(String::from)
        .collect();
    if remote.contains(SINGLE) {
        names.push(SINGLE.into());
    } else if remote.contains(INDEX) {
        get(INDEX)?;
        let index = zeroshard_offload::model_file::read(&snapshot, INDEX)?;
        let shards = zeroshard_offload::parse_index(&snapshot.join(INDEX), &index)?;
        if let Some(absent) = shards.iter().find(|s| !remote.contains(s.as_str())) {
            bail!("commit {sha}: {INDEX} names {absent}, which the repository does not have");
        }
        names.extend(shards);
    } else {
        bail!("commit {sha} has no {SINGLE} and no {INDEX} (zeroshard reads safetensors checkpoints)");
    }
    let todo: Vec<&String> = names.iter().filter(|n| !snapshot.join(n).exists()).collect();
    if !todo.is_empty() {
        zeroshard_offload::errln!(
            "downloading {} files of {id} (commit {sha}) into {}",
            todo.len(),
            env.cache.display()
        );
    }
    for name in todo {
        get(name)?;
    }
    if id.revision != sha {
        write_ref(&folder.join("refs").join(&id.revision), &sha)?;
        if !had_sha_ref {
            // hf-hub records the commit it fetched at as a ref of its own name.
            let _ = std::fs::remove_file(&sha_ref);
        }
    }
    Ok(snapshot)
}

/// `refs/<revision>` ← `sha`, replaced atomically.
fn write_ref(path: &Path, sha: &str) -> Result<()> {
    let parent = path.parent().expect("a ref path has a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, sha).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// An hf-hub error as one line that says what to do about it.
fn explain(e: ApiError, env: &HubEnv, doing: &str) -> anyhow::Error {
    let endpoint = &env.endpoint;
    if let ApiError::RequestError(r) = &e {
        match r.as_ref() {
            ureq::Error::Status(code @ (401 | 403), _) => {
                return anyhow!(
                    "{doing}: {endpoint} refused (HTTP {code}): no such model, or a gated or private one \
                     (set HF_TOKEN to a token with access)"
                )
            }
            ureq::Error::Status(404, _) => {
                return anyhow!("{doing}: {endpoint} has no such model or revision (HTTP 404)")
            }
            ureq::Error::Transport(t) => {
                return anyhow!(
                "{doing}: cannot reach {endpoint} ({t}); with HF_HUB_OFFLINE=1 only the hub cache {} is used",
                env.cache.display()
            )
            }
            ureq::Error::Status(..) => {}
        }
    }
    anyhow!("{doing} from {endpoint}: {e}")
}
