//! Which batch the detector runs when, with no I/O (issue 21).
//!
//! On a GPU the detector takes the next batch before it runs the one it
//! holds: the next batch's camera buffers upload on their own stream
//! while the batch before runs. [`Overlap`] keeps the batch waiting and
//! says which batches to run, in order, as work comes: anything that is
//! not frames (a new config or model, a camera's end, stop, or nothing to
//! do) first runs the batch waiting, so nothing overtakes frames taken
//! before it. Elsewhere each batch runs as soon as it is taken.

use std::time::Duration;

use crate::preprocess::UPLOAD_SLOTS;

// The two halves never meet: each holds the largest batch a run takes.
const _: () = assert!(UPLOAD_SLOTS / 2 >= crate::detector::MAX_BATCH);

/// The batch taken and waiting for its run, if any, and which half of
/// the upload slots the next overlapping batch takes.
#[derive(Debug)]
pub struct Overlap<B> {
    waiting: Option<B>,
    half: usize,
}

impl<B> Default for Overlap<B> {
    fn default() -> Self {
        Overlap {
            waiting: None,
            half: 0,
        }
    }
}

/// The batches to run now, oldest first: at most the one waiting and the
/// one just taken.
pub type Runs<B> = Vec<B>;

impl<B> Overlap<B> {
    /// How long the board may wait for work: `idle` with nothing waiting,
    /// not at all while a batch waits for its run.
    pub fn timeout(&self, idle: Duration) -> Duration {
        if self.waiting.is_some() {
            Duration::ZERO
        } else {
            idle
        }
    }

    /// The first upload slot of the batch about to be taken where batches
    /// overlap (one half of the slots for each of the two batches in
    /// flight); `None` where they do not.
    pub fn first_upload_slot(&self, overlapping: bool) -> Option<usize> {
        overlapping.then_some(self.half * (UPLOAD_SLOTS / 2))
    }

    /// A batch was taken: the batches to run now. Overlapping, the one
    /// waiting runs and the new one waits in its place; otherwise both run,
    /// the older first.
    pub fn taken(&mut self, batch: B, overlapping: bool) -> Runs<B> {
        let mut runs: Runs<B> = self.waiting.take().into_iter().collect();
        if overlapping {
            self.half = 1 - self.half;
            self.waiting = Some(batch);
        } else {
            runs.push(batch);
        }
        runs
    }

    /// Other work came, or none: the batch waiting runs first.
    pub fn before_other_work(&mut self) -> Option<B> {
        self.waiting.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(1);

    /// Overlapping: each batch runs when the next is taken, or before
    /// any other work; the halves of the upload slots alternate; the board
    /// does not wait while a batch waits.
    #[test]
    fn an_overlapping_batch_runs_when_the_next_is_taken_or_before_other_work_issue_21() {
        let mut overlap = Overlap::default();
        assert_eq!(overlap.timeout(IDLE), IDLE);
        assert_eq!(overlap.first_upload_slot(true), Some(0));
        assert!(overlap.taken("a", true).is_empty());
        assert_eq!(overlap.timeout(IDLE), Duration::ZERO);
        assert_eq!(overlap.first_upload_slot(true), Some(UPLOAD_SLOTS / 2));
        assert_eq!(overlap.taken("b", true), ["a"]);
        assert_eq!(overlap.first_upload_slot(true), Some(0));
        // A camera's end, a reload or nothing to do: "b" first.
        assert_eq!(overlap.before_other_work(), Some("b"));
        assert_eq!(overlap.before_other_work(), None);
        assert_eq!(overlap.timeout(IDLE), IDLE);
        assert!(overlap.taken("c", true).is_empty());
        assert_eq!(overlap.taken("d", true), ["c"]);
        assert_eq!(overlap.before_other_work(), Some("d"));
    }

    /// Without overlap (a host session) every batch runs as it is taken;
    /// after a swap away from a GPU the batch still waiting runs first.
    #[test]
    fn without_overlap_a_batch_runs_as_taken_after_any_batch_waiting_issue_21() {
        let mut overlap = Overlap::default();
        assert_eq!(overlap.first_upload_slot(false), None);
        assert_eq!(overlap.taken(1, false), [1]);
        assert_eq!(overlap.timeout(IDLE), IDLE);
        assert!(overlap.taken(2, true).is_empty());
        assert_eq!(overlap.taken(3, false), [2, 3]);
        assert_eq!(overlap.before_other_work(), None);
    }
}
