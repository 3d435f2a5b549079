//! Run directories: start modes and their refusals, the run record, scripts,
//! atomic writes, record comparison for `lcasr reproduce`, git and timestamps.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use lcasr::hash::sha256_hex;
use lcasr::run::run_dir::{
    compare_records, git_commit, now_utc, utc_timestamp, ResumeRecord, RunDir, RunRecord, StartMode,
};

fn record() -> RunRecord {
    RunRecord {
        program_version: "0.1.0".into(),
        git_commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
        command_line: vec!["lcasr".into(), "train".into(), "cfg.yaml".into()],
        started_at: "2024-02-29T23:59:59Z".into(),
        seed: 42,
        config_sha256: sha256_hex(b"model: {}\n"),
        scripts: BTreeMap::from([
            ("train.rhai".to_string(), sha256_hex(b"train();\n")),
            ("lib/augment.rhai".to_string(), sha256_hex(b"fn aug() {}\n")),
        ]),
        tokenizer_sha256: Some(sha256_hex(b"tokenizer")),
        data_manifest_sha256: None,
        entry_script: None,
        script_args: BTreeMap::new(),
        resumes: Vec::new(),
        ranks: 1,
    }
}

const SUBDIRS: [&str; 4] = ["checkpoints", "plots", "scripts", "tensorboard"];

#[test]
fn new_creates_the_layout_and_refuses_a_non_empty_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("runs/first");
    let run = RunDir::start(&root, StartMode::New).unwrap();
    assert_eq!(run.root(), root);
    assert_eq!(common::entry_names(&root), SUBDIRS);
    assert_eq!(run.metrics_path(), root.join("metrics.jsonl"));
    assert_eq!(run.tensorboard_dir(), root.join("tensorboard"));
    assert_eq!(run.plots_dir(), root.join("plots"));
    assert_eq!(run.config_path(), root.join("config.yaml"));
    assert_eq!(run.path("a/b.txt"), root.join("a/b.txt"));
    assert_eq!(run.checkpoints(3).dir(), root.join("checkpoints"));
    assert_eq!(run.checkpoints(3).keep_last(), 3);

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    RunDir::start(&empty, StartMode::New).unwrap();

    let err = RunDir::start(&root, StartMode::New).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("--resume {}", root.display())),
        "{msg}"
    );
    assert!(msg.contains("--force"), "{msg}");
    assert!(msg.contains("not empty"), "{msg}");

    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = RunDir::start(&file, StartMode::New).unwrap_err();
    assert!(format!("{err:#}").contains("not a directory"), "{err:#}");
}

#[test]
fn force_replaces_a_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let run = RunDir::start(&root, StartMode::New).unwrap();
    run.write_config("seed: 1\n").unwrap();
    run.write_record(&record()).unwrap();
    run.write_script("train.rhai", "train();\n").unwrap();
    std::fs::write(run.metrics_path(), b"{\"step\":1}\n").unwrap();
    std::fs::create_dir(run.path("checkpoints/step_000000001")).unwrap();

    let run = RunDir::start(&root, StartMode::Force).unwrap();
    assert_eq!(common::entry_names(run.root()), SUBDIRS);
    assert!(common::entry_names(&run.scripts_dir()).is_empty());
    assert!(common::entry_names(&run.path("checkpoints")).is_empty());
}

#[test]
fn force_accepts_a_run_that_stopped_before_its_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let run = RunDir::start(&root, StartMode::New).unwrap();
    run.write_config("seed: 1\n").unwrap();
    RunDir::start(&root, StartMode::Force).unwrap();
    assert_eq!(common::entry_names(&root), SUBDIRS);
}

#[test]
fn force_refuses_to_delete_a_folder_that_is_not_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("thesis");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("chapter1.tex"), b"precious").unwrap();
    std::fs::create_dir(root.join("checkpoints")).unwrap();

    let err = RunDir::start(&root, StartMode::Force).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("refusing to delete {}", root.display())),
        "{msg}"
    );
    assert!(msg.contains("manifest.json"), "{msg}");
    assert_eq!(
        std::fs::read(root.join("chapter1.tex")).unwrap(),
        b"precious"
    );
    assert_eq!(
        common::entry_names(&root),
        vec!["chapter1.tex", "checkpoints"]
    );
}

#[test]
fn resume_requires_a_manifest_and_records_each_resumption() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let err = RunDir::start(&root, StartMode::Resume).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("cannot resume {}", root.display())),
        "{msg}"
    );
    assert!(msg.contains("no manifest.json"), "{msg}");
    assert!(!root.exists(), "a refused resume created the directory");
    assert!(RunDir::open(&root).is_err());

    let run = RunDir::start(&root, StartMode::New).unwrap();
    let original = record();
    run.write_record(&original).unwrap();
    std::fs::remove_dir(run.plots_dir()).unwrap();

    let resumed = RunDir::start(&root, StartMode::Resume).unwrap();
    assert!(resumed.plots_dir().is_dir(), "resume recreates sub-folders");
    assert_eq!(resumed.read_record().unwrap(), original);
    let first = ResumeRecord {
        at: "2024-03-01T00:00:00Z".into(),
        command_line: vec!["lcasr".into(), "train".into(), "--resume".into()],
        from_checkpoint: "checkpoints/step_000000100".into(),
    };
    let second = ResumeRecord {
        from_checkpoint: "checkpoints/step_000000200".into(),
        ..first.clone()
    };
    resumed.append_resume(first.clone()).unwrap();
    resumed.append_resume(second.clone()).unwrap();
    let read = RunDir::open(&root).unwrap().read_record().unwrap();
    assert_eq!(read.resumes, vec![first, second]);
    assert_eq!(
        RunRecord {
            resumes: Vec::new(),
            ..read
        },
        original
    );
}

#[test]
fn garbled_manifest_is_reported_with_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::start(tmp.path(), StartMode::New).unwrap();
    std::fs::write(run.path("manifest.json"), b"{\"seed\": ").unwrap();
    let err = run.read_record().unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("manifest.json"), "{msg}");
    assert!(msg.contains("not a valid run record"), "{msg}");
}

#[test]
fn scripts_are_kept_as_loaded_and_names_may_not_escape() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let run = RunDir::start(&root, StartMode::New).unwrap();
    run.write_script("train.rhai", "train();\n").unwrap();
    run.write_script("lib/augment.rhai", "fn aug() {}\n")
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("scripts/lib/augment.rhai")).unwrap(),
        "fn aug() {}\n"
    );
    for bad in [
        "../evil.rhai",
        "lib/../../evil.rhai",
        "/etc/evil.rhai",
        "./a.rhai",
        "",
    ] {
        let err = run.write_script(bad, "evil();").unwrap_err();
        assert!(format!("{err:#}").contains(&format!("`{bad}`")), "{err:#}");
    }
    assert_eq!(common::entry_names(tmp.path()), vec!["run"]);
    assert_eq!(
        common::entry_names(&run.scripts_dir()),
        vec!["lib", "train.rhai"]
    );
}

#[test]
fn rewrites_are_atomic_and_leave_no_temporary_files() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::start(tmp.path(), StartMode::New).unwrap();
    run.write_config("seed: 1\n").unwrap();
    run.write_config("seed: 2\n").unwrap();
    run.write_script("train.rhai", "v1").unwrap();
    run.write_script("train.rhai", "v2").unwrap();
    let mut rec = record();
    run.write_record(&rec).unwrap();
    rec.seed = 7;
    run.write_record(&rec).unwrap();

    assert_eq!(
        std::fs::read_to_string(run.config_path()).unwrap(),
        "seed: 2\n"
    );
    assert_eq!(
        std::fs::read_to_string(run.scripts_dir().join("train.rhai")).unwrap(),
        "v2"
    );
    assert_eq!(run.read_record().unwrap().seed, 7);
    let mut want: Vec<String> = SUBDIRS.iter().map(|s| s.to_string()).collect();
    want.extend(["config.yaml".into(), "manifest.json".into()]);
    want.sort();
    assert_eq!(common::entry_names(tmp.path()), want);
    assert_eq!(common::entry_names(&run.scripts_dir()), vec!["train.rhai"]);
}

#[test]
fn compare_records_states_every_mismatch() {
    let recorded = record();
    assert!(compare_records(&recorded, &recorded.clone()).is_empty());

    // Inputs other than hashes (version, commit, times) are not mismatches.
    let mut later = recorded.clone();
    later.program_version = "0.2.0".into();
    later.git_commit = None;
    later.started_at = "2025-01-01T00:00:00Z".into();
    later.command_line = vec!["lcasr".into(), "reproduce".into()];
    assert!(compare_records(&recorded, &later).is_empty());

    let mut edited = recorded.clone();
    let new_hash = sha256_hex(b"train(); // edited\n");
    edited.scripts.insert("train.rhai".into(), new_hash.clone());
    let diffs = compare_records(&recorded, &edited);
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    let old_hash = &recorded.scripts["train.rhai"];
    assert!(
        diffs[0].starts_with("script `train.rhai` differs"),
        "{diffs:?}"
    );
    assert!(diffs[0].contains(&old_hash[..12]), "{diffs:?}");
    assert!(diffs[0].contains(&new_hash[..12]), "{diffs:?}");

    let mut changed = recorded.clone();
    changed.seed = 43;
    changed.config_sha256 = sha256_hex(b"model: {d_model: 8}\n");
    changed.scripts.remove("lib/augment.rhai");
    changed
        .scripts
        .insert("extra.rhai".into(), sha256_hex(b"x"));
    changed.tokenizer_sha256 = None;
    changed.data_manifest_sha256 = Some(sha256_hex(b"manifest"));
    let diffs = compare_records(&recorded, &changed);
    assert_eq!(diffs.len(), 6, "{diffs:#?}");
    let has = |needle: &str| diffs.iter().any(|d| d.contains(needle));
    assert!(has("seed differs (recorded 42, now 43)"), "{diffs:#?}");
    assert!(has("config differs"), "{diffs:#?}");
    assert!(
        has("script `lib/augment.rhai` was used by the recorded run but is not used now"),
        "{diffs:#?}"
    );
    assert!(
        has("script `extra.rhai` is used now but was not used by the recorded run"),
        "{diffs:#?}"
    );
    assert!(has("recorded run used a tokenizer"), "{diffs:#?}");
    assert!(has("a data manifest is used now"), "{diffs:#?}");
}

#[test]
fn timestamps_are_rfc3339_utc() {
    let at = |secs: u64| utc_timestamp(UNIX_EPOCH + Duration::from_secs(secs));
    assert_eq!(at(0), "1970-01-01T00:00:00Z");
    assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(at(1_234_567_890), "2009-02-13T23:31:30Z");
    assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
    assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00Z");
    assert_eq!(
        utc_timestamp(UNIX_EPOCH + Duration::from_millis(1_500)),
        "1970-01-01T00:00:01Z"
    );
    let now = now_utc();
    assert_eq!(now.len(), 20, "{now}");
    assert!(now.as_str() > "2024-01-01T00:00:00Z", "{now}");
}

/// Runs git in `dir` with a fixed identity; panics if it fails.
fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?} failed");
}

#[test]
fn git_commit_names_head_and_marks_local_changes() {
    if Command::new("git").arg("--version").output().is_err() {
        eprintln!("git is not installed; skipping");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let outside_repo = git_commit(&repo);
    // A temporary folder inside some work tree would make this meaningless.
    let in_tree = Command::new("git")
        .args(["rev-parse", "--is-inside-work-tree"])
        .current_dir(&repo)
        .output()
        .unwrap()
        .status
        .success();
    if !in_tree {
        assert_eq!(outside_repo, None);
    }

    git(&repo, &["init", "-q"]);
    assert_eq!(git_commit(&repo), None, "no commit yet");
    std::fs::write(repo.join("a.txt"), b"one").unwrap();
    git(&repo, &["add", "a.txt"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    let clean = git_commit(&repo).unwrap();
    assert_eq!(clean.len(), 40, "{clean}");
    assert!(clean.bytes().all(|b| b.is_ascii_hexdigit()), "{clean}");

    std::fs::write(repo.join("a.txt"), b"two").unwrap();
    assert_eq!(git_commit(&repo), Some(format!("{clean}-dirty")));
    assert_eq!(
        git_commit(&repo.join("missing-folder")),
        None,
        "a missing folder is a failure, not a commit"
    );
}
