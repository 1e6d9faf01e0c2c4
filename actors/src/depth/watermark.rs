//! Watermarks: high/low hysteresis of a queue's depth, and the share of the
//! room below `high` each producer of the queue may take between samples.

/// High/low watermarks of a queue (ready messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermark {
    /// Upstream stages pause at or above this depth.
    pub high: u64,
    /// ...and resume at or below this one.
    pub low: u64,
}

/// Whether a queue counts as above its watermark after a sample of `depth`,
/// given whether it was above before (hysteresis between `low` and `high`).
pub(crate) fn above_watermark(was_above: bool, depth: u64, w: Watermark) -> bool {
    if was_above {
        depth > w.low
    } else {
        depth >= w.high
    }
}

/// The one share formula: what is left below `high` at `depth`, split
/// between `sharers` (the stages feeding the queue, and for the ingress
/// headroom one more, the ingress itself). Between two samples each sharer
/// takes at most its share.
pub(crate) fn share(w: Watermark, depth: u64, sharers: u64) -> u64 {
    w.high.saturating_sub(depth) / sharers.max(1)
}

/// How many stages feed `queue` (publish to it), given each stage's
/// output queues.
pub(crate) fn feeders<'a>(outputs: impl Iterator<Item = &'a [String]>, queue: &str) -> u64 {
    outputs.filter(|o| o.iter().any(|q| q == queue)).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Watermark = Watermark { high: 100, low: 20 };

    #[test]
    fn watermark_has_hysteresis() {
        let seq = [0, 50, 99, 100, 150, 60, 21, 20, 50, 99, 100];
        let mut above = false;
        let got: Vec<bool> = seq
            .iter()
            .map(|d| {
                above = above_watermark(above, *d, W);
                above
            })
            .collect();
        assert_eq!(
            got,
            [false, false, false, true, true, true, true, false, false, false, true]
        );
    }

    #[test]
    fn shares_never_exceed_the_room() {
        assert_eq!(share(W, 40, 1), 60);
        assert_eq!(share(W, 40, 2), 30);
        assert_eq!(share(W, 150, 3), 0);
        assert_eq!(share(W, 0, 0), 100, "no sharer counts as one");
    }

    #[test]
    fn feeders_are_the_stages_publishing_to_the_queue() {
        let outs = |qs: &[&str]| qs.iter().map(|q| (*q).to_owned()).collect::<Vec<_>>();
        let stages = [
            outs(&["a", "b"]),
            outs(&["b"]),
            outs(&[]),
            outs(&["c", "b"]),
        ];
        let count = |q| feeders(stages.iter().map(Vec::as_slice), q);
        assert_eq!(count("b"), 3);
        assert_eq!(count("a"), 1);
        assert_eq!(count("z"), 0);
    }
}
