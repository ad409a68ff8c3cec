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
