//! Batch-1 exports made batchable for GPUs that serve several cameras:
//! the rewrite on the real models, checked by running batch 4 against
//! four single runs on the CPU.

#![allow(clippy::unwrap_used)]

mod support;

use nanodetd::backend::validate_batch;
use nanodetd::model::dynamic_batch;
use support::{assets, model};

#[test]
fn nanodet_exports_batch_where_the_graph_allows_and_say_why_where_not() {
    let Some(a) = assets("nanodet_exports_batch") else {
        return;
    };
    for (name, side, batchable) in [
        ("nanodet-plus-m_320", 320, true),
        ("nanodet-plus-m_416", 416, true),
        // The legacy exports fold the batch into the priors: outputs are
        // [priors, classes] without a batch axis, and the integral head
        // reshapes to [-1, 8]. No constant rewrite can undo that.
        ("nanodet-m_320", 320, false),
        ("nanodet-m-0.5x_320", 320, false),
    ] {
        let bytes = std::fs::read(model(&a, name)).unwrap();
        let (rewritten, report) = dynamic_batch(&bytes).unwrap();
        assert!(report.reshapes > 0, "{name}: {report:?}");
        let verdict = validate_batch(&rewritten, (side, side), 4);
        eprintln!("{name}: {report:?}: {verdict:?}");
        match (batchable, verdict) {
            (true, Ok(())) => {}
            (false, Err(why)) => assert!(why.contains("folds the batch"), "{why}"),
            (expected, got) => panic!("{name}: expected batchable={expected}, got {got:?}"),
        }
        // The original, untouched, is not batchable at all.
        assert!(validate_batch(&bytes, (side, side), 2).is_err(), "{name}");
    }
}

#[test]
fn the_batch_check_runs_once_per_model_and_its_verdict_is_kept() {
    use nanodetd::backend::batchable;
    let Some(a) = assets("the_batch_check_runs_once_per_model") else {
        return;
    };
    let memo = tempfile::tempdir().unwrap();
    let memo_dir = memo.path().join("engines");
    let memos = || -> Vec<(String, String)> {
        let mut found: Vec<(String, String)> = std::fs::read_dir(&memo_dir)
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&path).unwrap())
            })
            .collect();
        found.sort();
        found
    };

    let plus = std::fs::read(model(&a, "nanodet-plus-m_320")).unwrap();
    let (rewritten, batch, why) = batchable(&plus, 4, &memo_dir);
    assert_eq!((batch, why.as_deref()), (4, None));
    assert_ne!(rewritten, plus);
    let kept = memos();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].1, "ok");

    let legacy = std::fs::read(model(&a, "nanodet-m_320")).unwrap();
    let (unchanged, batch, why) = batchable(&legacy, 4, &memo_dir);
    assert_eq!((batch, unchanged == legacy), (1, true));
    let why = why.unwrap();
    assert!(why.contains("folds the batch"), "{why}");
    assert!(memos().iter().any(|(_, verdict)| *verdict == why));

    // A kept verdict is believed, not re-checked: this one is planted.
    std::fs::write(memo_dir.join(&kept[0].0), "planted verdict").unwrap();
    let (_, batch, why) = batchable(&plus, 4, &memo_dir);
    assert_eq!((batch, why.as_deref()), (1, Some("planted verdict")));

    // Batch 1 asked: nothing to check, nothing kept.
    let (same, batch, why) = batchable(&plus, 1, &memo.path().join("unused"));
    assert_eq!((same == plus, batch, why), (true, 1, None));
    assert!(!memo.path().join("unused").exists());
}
