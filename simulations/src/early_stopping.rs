//! Early stopping on a validation score: the best score checked so far, where it was
//! checked, and how many checks since have not beaten it.

use std::ops::ControlFlow;

/// Stops once `patience` checks in a row have not beaten the best score (ties do not
/// count as beating it).
#[derive(Clone, Debug)]
pub struct Patience {
    patience: usize,
    best: Option<(usize, f64)>,
    since_best: usize,
    checks: Vec<(usize, f64)>,
}

impl Patience {
    pub fn new(patience: usize) -> Self {
        Self { patience: patience.max(1), best: None, since_best: 0, checks: Vec::new() }
    }

    /// Records `score` after `step` steps. Returns whether it is the new best, and whether
    /// to stop: `Break` once `patience` checks in a row have not beaten the best. A NaN
    /// never beats anything.
    pub fn observe(&mut self, step: usize, score: f64) -> (bool, ControlFlow<()>) {
        self.checks.push((step, score));
        let improved = self.best.is_none_or(|(_, best)| score > best) && !score.is_nan();
        if improved {
            self.best = Some((step, score));
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        let flow =
            if self.since_best >= self.patience { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
        (improved, flow)
    }

    /// The best check's step and score.
    pub fn best(&self) -> Option<(usize, f64)> {
        self.best
    }

    /// Every check, in order: (steps, score).
    pub fn checks(&self) -> &[(usize, f64)] {
        &self.checks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_after_patience_checks_without_a_new_best_and_keeps_the_best() {
        let mut p = Patience::new(2);
        let scores = [0.030, 0.040, 0.045, 0.044, 0.046, 0.046, 0.045];
        let mut stopped_at = None;
        for (k, &score) in scores.iter().enumerate() {
            let (_, flow) = p.observe(100 * k, score);
            if flow.is_break() {
                stopped_at = Some(k);
                break;
            }
        }
        // 0.046 at step 400 is the last best; a tie at 500 and a fall at 600 end it.
        assert_eq!(stopped_at, Some(6));
        assert_eq!(p.best(), Some((400, 0.046)));
        assert_eq!(p.checks().len(), 7);
    }

    #[test]
    fn a_new_best_resets_the_count_and_a_nan_never_wins() {
        let mut p = Patience::new(2);
        assert_eq!(p.observe(0, f64::NAN), (false, ControlFlow::Continue(())));
        assert_eq!(p.observe(1, 0.01), (true, ControlFlow::Continue(())));
        assert_eq!(p.observe(2, 0.00), (false, ControlFlow::Continue(())));
        assert_eq!(p.observe(3, 0.02), (true, ControlFlow::Continue(())));
        assert_eq!(p.observe(4, f64::NAN), (false, ControlFlow::Continue(())));
        assert_eq!(p.observe(5, 0.02), (false, ControlFlow::Break(())));
        assert_eq!(p.best(), Some((3, 0.02)));
    }
}
